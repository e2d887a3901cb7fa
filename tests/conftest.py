"""Shared fixtures: offline, a tiny random open_clip model and a generated dataset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from helpers import write_split_dataset, write_tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny model config and a 6-class split-file dataset ``toy`` (plus a shifted
    copy ``toy_shift``) registered through ``$VLPROMPT_DATASETS_SPEC``."""
    root = tmp_path_factory.mktemp("world")
    config = write_tiny_config(root)
    specs = write_split_dataset(root / "data", "toy", seed=0)
    write_split_dataset(root / "data", "toy_shift", seed=1)
    return {"root": root, "config": config, "specs": specs, "data": root / "data"}


@pytest.fixture()
def registry(world, monkeypatch):
    """A fresh registry that sees the test datasets."""
    from vlprompt_core.plugins import get_registry

    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
    return get_registry(refresh=True)


@pytest.fixture()
def tiny_backbone(world):
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip
    import torch

    torch.manual_seed(0)
    return build_open_clip(OpenClipOptions(model=str(world["config"]), pretrained=None))
