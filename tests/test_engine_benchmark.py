"""``benchmarks/engine.py`` runs end to end in smoke mode (CI): every section
reports, and the engine agrees with textbook mode. Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "engine.py"


@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not part of this checkout")
def test_engine_benchmark_smoke_mode(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], check=False,
                            capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())

    # the same logits on a fixed batch and the same accuracies after training, chunked or not
    assert record["equal_logits"]["max_abs_diff"] < 1e-4
    modes = {(r["method"], r["mode"], str(r["chunk"])) for r in record["equal_logits"]["rows"]}
    assert ("cocoop", "textbook", "0") in modes and ("coop", "engine", "5") in modes
    assert record["equal_accuracy"]["max_difference_points"] <= 0.1
    assert len(record["equal_accuracy"]["accuracies"]) == 3

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
    # smoke mode estimates BPL's textbook pairs: not run in textbook mode, run whole by the engine
    assert not any(key.startswith("bpl ") for key in run["pairs"]["textbook"])
    assert {key for key in run["pairs"]["engine"] if key.startswith("bpl ")} == {"bpl seed 1", "bpl seed 2",
                                                                                  "bpl seed 3"}
    estimate = run["estimated"]["bpl"]
    for mode in ("textbook", "engine"):
        row = estimate[mode]
        assert row["batch_size"] == 1 and row["steps"] == 5  # 5 base classes x 1 shot at BPL's batch 1
        assert row["pair_s"] == pytest.approx(row["steps"] * row["step_s"] + row["eval_s"])
    assert estimate["textbook_total_s"] == pytest.approx(3 * estimate["textbook"]["pair_s"])
    assert run["textbook_total_s"] == pytest.approx(run["wall_s"]["textbook"] + estimate["textbook_total_s"])
    assert run["ratio"] == pytest.approx(run["textbook_total_s"] / run["wall_s"]["engine"])
    assert "textbook/engine" in result.stdout and "[run]" in result.stdout
