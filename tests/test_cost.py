"""Cost figures: per-pair peak memory, and images per second from counted images."""

from __future__ import annotations

import pytest
import torch

from vlprompt_core.cost import PeakMemory
from vlprompt_core.engine import Engine
from vlprompt_core.results import aggregate_cost
from vlprompt_core.spec import validate_spec


def test_peak_rss_is_per_stretch_of_work_not_the_process_lifetime():
    with PeakMemory(torch.device("cpu")) as big:
        block = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
        del block
    with PeakMemory(torch.device("cpu")) as small:
        torch.ones(1000).sum()
    assert big.kind == small.kind == "rss"
    assert big.mb - small.mb > 250  # the second stretch does not inherit the first one's peak


def test_images_per_second_count_every_trained_and_scored_image(world, registry, tmp_path):
    spec = validate_spec({
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": [{"name": "coop", "n_ctx": 2}],
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        "train": {"epochs": 3, "batch_size": 4, "seeds": [1]},
        "output": str(tmp_path / "out"),
    }, registry)
    engine = Engine(spec, registry)
    record = engine.run()
    (run,) = record["runs"]
    cost = run["cost"]
    # 6 classes x 2 shots = 12 images, 3 full batches of 4 per epoch, 3 epochs
    assert cost["train_images_per_s"] * cost["time_s"]["train"] == pytest.approx(3 * 12)
    n_test = len(engine.load_dataset(spec.dataset).test)
    assert n_test > 0 and cost["eval_images_per_s"] * cost["time_s"]["eval"] == pytest.approx(n_test)
    assert record["cost"]["coop"]["trainable_parameters"]["mean"] == 2 * 32


def test_aggregate_cost_skips_pairs_kept_from_results_without_cost():
    runs = [
        {"method": "a", "cost": {"time_s": {"total": 2.0}, "peak_memory_mb": 100.0, "trainable_parameters": 8}},
        {"method": "a", "cost": {"time_s": {"total": 4.0}, "peak_memory_mb": 300.0, "trainable_parameters": 8}},
        {"method": "a"},  # written by an older vlprompt
        {"method": "b", "cost": {"time_s": {"total": 1.0}, "train_images_per_s": None}},
    ]
    cost = aggregate_cost(runs)
    assert cost["a"]["time_s"] == {"mean": 3.0, "std": 1.0, "n": 2}
    assert cost["a"]["peak_memory_mb"] == {"mean": 200.0, "std": 100.0, "n": 2}
    assert "train_images_per_s" not in cost["b"] and cost["b"]["time_s"]["n"] == 1
