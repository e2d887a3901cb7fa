"""The quickstart is the project's front door: guard what it shows on the embedded world."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlprompt_core.engine import Engine
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.spec import load_spec

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


@pytest.fixture(scope="module")
def quickstart_seed1(tmp_path_factory):
    """The quickstart spec as shipped, on one seed, for the two baselines (each other method
    runs under every protocol in its own contract suite), in a temporary data root."""
    tmp = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATA", str(tmp / "data"))
        reg = build_registry(*make_plugin_manager())
        spec = load_spec(QUICKSTART, reg)
        spec.train.seeds = [1]
        spec.method = [m for m in spec.method if m.name in ("zeroshot", "coop")]
        spec.output = tmp / "out"
        return Engine(spec, reg).run()


def test_quickstart_runs_every_installed_method():
    reg = build_registry(*make_plugin_manager())
    spec = load_spec(QUICKSTART, reg)
    assert sorted(m.name for m in spec.method) == reg.names("method")


def test_quickstart_reports_base_novel_and_h(quickstart_seed1):
    assert list(quickstart_seed1["summary"]["zeroshot"]) == ["base", "novel", "H"]


def test_zero_shot_is_well_above_chance_on_novel_classes(quickstart_seed1):
    n_novel = 16  # embedded_objects: 32 classes, novel = the last 16
    novel = quickstart_seed1["summary"]["zeroshot"]["novel"]["mean"]
    assert novel >= 3 * 100 / n_novel


def test_coop_beats_zero_shot_on_base_classes_by_ten_points(quickstart_seed1):
    summary = quickstart_seed1["summary"]
    assert summary["coop"]["base"]["mean"] >= summary["zeroshot"]["base"]["mean"] + 10
