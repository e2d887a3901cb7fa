"""Shared fixtures: offline, a tiny random open_clip model and a generated dataset.

And the suite's settings (this file is loaded first, for ``kernels/tests`` and
``plugins`` too): one torch thread per process, so that parallel workers (``-n``,
``scripts/test.sh``) and a busy machine do not oversubscribe the cores (the tiny
models gain nothing from threads), subprocesses included; hypothesis without a
deadline (an example's time depends on the machine, never its outcome); no terminal
size in the environment; the ``slow`` mark on the method contract's end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; inherited by subprocesses
# No terminal size: pytest imports readline (its capture plugin), which exports LINES and
# COLUMNS (80 x 24 without a terminal) to processes started later, parallel workers
# included; a console made at import would keep that width.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)
    os.unsetenv(_name)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from vlprompt_core.testing import MethodContract, make_world, tiny_backbone as _tiny_backbone  # noqa: E402

pytest_plugins = ["pytester"]

if os.environ["OMP_NUM_THREADS"].isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also where torch was imported earlier
settings.register_profile("vlprompt", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vlprompt"))


#: The modules that take longest (module-scoped runs, processes started, ``--durations``),
#: longest first. They are collected first, so that in parallel (scripts/test.sh: whole
#: modules to a worker, in collection order: ``--dist loadscope --no-loadscope-reorder``)
#: they start first and no worker runs one of them alone at the end while the others wait.
LONGEST_FIRST = ("tests/test_distributed.py", "tests/test_sweep.py", "tests/test_reliability.py", "tests/test_trust_faults.py",
                 "tests/test_datasets.py", "tests/test_trust_inputs.py", "tests/test_resume.py",
                 "tests/test_quickstart.py")


@pytest.hookimpl(tryfirst=True)  # before -m selects
def pytest_collection_modifyitems(config, items):
    """The method contract's end-to-end tests (whole runs through the engine, for each
    plug-in and case) are ``slow``; its checks of the built method are not. The modules
    of :data:`LONGEST_FIRST` first, the rest in their order."""
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is not None and issubclass(cls, MethodContract) and item.originalname in MethodContract.END_TO_END:
            item.add_marker(pytest.mark.slow)
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


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
