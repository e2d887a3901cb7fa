"""Shared fixtures: offline, a tiny random open_clip model and a generated dataset."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vlprompt_core.testing import make_world, tiny_backbone as _tiny_backbone  # noqa: E402

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny model config and a 6-class split-file dataset ``toy`` (plus a shifted
    copy ``toy_shift``) registered through ``$VLPROMPT_DATASETS_SPEC``."""
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture()
def registry(world, monkeypatch):
    """A fresh registry that sees the test datasets."""
    from vlprompt_core.plugins import get_registry

    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
    return get_registry(refresh=True)


@pytest.fixture()
def tiny_backbone(world):
    return _tiny_backbone(world["root"])


@pytest.fixture(scope="module")
def toy_registry(world):
    """A registry (not the process-wide one) with the toy methods of ``toy_methods.py``
    and the test datasets."""
    from toy_methods import Plugin
    from vlprompt_core.plugins import build_registry, make_plugin_manager

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
        yield build_registry(*make_plugin_manager(extra=(("toys", Plugin()),)))
