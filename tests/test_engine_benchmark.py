"""``benchmarks/engine.py`` runs end to end in smoke mode (CI): every section
reports, and the engine agrees with textbook mode. Timings are never asserted.

The script's ``main`` runs in this process (what is checked is the benchmark's code,
not how it starts; a subprocess would pay the imports again)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "engine.py"


def load_script():
    spec = importlib.util.spec_from_file_location("vlprompt_benchmark_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not part of this checkout")
def test_engine_benchmark_smoke_mode(tmp_path, monkeypatch, capsys):
    import vlprompt_core.plugins as plugins

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLPROMPT_DATA", str(tmp_path / "data"))  # embedded datasets, if any, go here
    monkeypatch.setattr(plugins, "_REGISTRY", None)  # the installed plug-ins, as a fresh process sees them
    out = tmp_path / "bench.json"
    load_script().main(["--smoke", "--json", str(out)])
    stdout = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["smoke"] is True

    # the same logits on a fixed batch and the same accuracies after training, chunked or not
    assert record["equal_logits"]["max_abs_diff"] < 1e-4
    modes = {(r["method"], r["mode"], str(r["chunk"])) for r in record["equal_logits"]["rows"]}
    assert ("cocoop", "textbook", "0") in modes and ("coop", "engine", "5") in modes
    assert record["equal_accuracy"]["max_difference_points"] <= 0.1
    assert len(record["equal_accuracy"]["accuracies"]) == 3
    for accuracy in record["equal_accuracy"]["accuracies"].values():
        assert set(accuracy) == {"coop", "cocoop"} and all(set(d) == {"base", "novel"} for d in accuracy.values())

    assert [row["classes"] for row in record["steps"]] == [10, 100]
    for row in record["steps"]:
        for mode in ("textbook", "engine"):
            assert row[mode]["train_step_s"] > 0 and row[mode]["eval_s"] > 0 and row[mode]["train_peak_mb"] > 0
        assert row["step_ratio"] == pytest.approx(row["textbook"]["train_step_s"] / row["engine"]["train_step_s"])
    assert record["cache"]["ratio"] == pytest.approx(record["cache"]["first_s"] / record["cache"]["second_s"])
    assert set(record["views"]) == {"0", "2"}
    for k, row in record["views"].items():
        assert set(row["summary"]) == {"coop", "cocoop"} and all(t > 0 for t in row["epoch_s"].values())
    assert record["cocoop"]["ratio"] > 0

    run = record["run"]
    assert set(run["wall_s"]) == {"textbook", "engine"}
    # smoke mode runs CoOp whole in both modes and estimates BPL's textbook pairs: BPL is
    # not run in textbook mode, and run whole by the engine
    seeds = {"seed 1", "seed 2"}
    assert set(run["pairs"]["textbook"]) == {f"coop {s}" for s in seeds}
    assert set(run["pairs"]["engine"]) == {f"{m} {s}" for m in ("coop", "bpl") for s in seeds}
    estimate = run["estimated"]["bpl"]
    for mode in ("textbook", "engine"):
        row = estimate[mode]
        assert row["batch_size"] == 1 and row["steps"] == 5  # 5 base classes x 1 shot at BPL's batch 1
        assert row["pair_s"] == pytest.approx(row["steps"] * row["step_s"] + row["eval_s"])
    assert estimate["textbook_total_s"] == pytest.approx(len(seeds) * estimate["textbook"]["pair_s"])
    assert run["textbook_total_s"] == pytest.approx(run["wall_s"]["textbook"] + estimate["textbook_total_s"])
    assert run["ratio"] == pytest.approx(run["textbook_total_s"] / run["wall_s"]["engine"])
    assert "textbook/engine" in stdout and "[run]" in stdout
    for section in ("equal", "steps", "cache", "views", "cocoop", "run"):
        assert f"[{section}]" in stdout, section
