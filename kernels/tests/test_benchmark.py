"""``benchmarks/kernels.py`` runs end to end in smoke mode (CI).

Only that it runs and reports every case for every implementation: timings are
never asserted. ``torch.compile`` is left out here (its first CPU compile takes
~25 s); ``nox -s bench`` runs the smoke mode with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not part of this checkout")
def test_benchmark_smoke_mode_reports_every_case(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--no-compile", "--tail", "--reps", "2", "--json", str(out)],
        check=False, capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["mode"] == "smoke"
    cases = {(r["op"], r["layout"], r["batch"], r["pass_"]) for r in record["rows"]}
    assert len(cases) == len(record["rows"]) == 2 * (1 + 2) + 2 * 2 * 2  # assembly: CoOp + 2 batches; cosine
    expected_impls = set(record["impls"])
    assert "eager" in expected_impls
    if record["triton"] and (record["triton_interpreter"] or record["device"] != "CPU"):
        assert "triton" in expected_impls  # whenever Triton can run here, it was measured
    for row in record["rows"]:
        assert set(row["ms"]) == expected_impls, row
        assert all(isinstance(v, float) and v > 0 for v in row["ms"].values()), row  # no OOM, no error
        if "triton" in expected_impls:
            assert row["speedup"]["triton"] == pytest.approx(row["ms"]["eager"] / row["ms"]["triton"])
    assert {t["part"] for t in record["tail"] if "ms" in t} >= {"transformer block (x1)", "cosine logits (shared text)"}
    assert "eager ms" in result.stdout and "# done in" in result.stdout
    assert ("triton/eager" in result.stdout) == ("triton" in expected_impls)
