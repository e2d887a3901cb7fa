"""The engine, end to end on the tiny backbone and the 6-class toy dataset (CPU).

Runs are module-scoped and shared between tests to keep the file fast: one
fp32 run with two seeds (then resumed), one bf16 run, one rerun of seed 1.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vlprompt_core.engine import Engine, lr_at
from vlprompt_core.plugins import Registry, build_registry, make_plugin_manager
from vlprompt_core.results import package_versions
from vlprompt_core.spec import TrainSpec, validate_spec

N_TEST = 6 * 3  # toy: 6 classes x 3 test images


# ---------------------------------------------------------------- schedule


def test_lr_at_reference_schedule():
    t = TrainSpec(lr=0.002, epochs=50, warmup_epochs=1, warmup_lr=1e-5)
    assert lr_at(0, t) == 1e-5
    assert lr_at(1, t) == pytest.approx(0.002, rel=1e-12)
    assert lr_at(2, t) == pytest.approx(1.998e-3, rel=1e-4)
    assert lr_at(49, t) == pytest.approx(7.9e-6, rel=0.01)
    for e in range(1, 50):
        assert lr_at(e, t) == pytest.approx(0.002 * (1 + math.cos(math.pi * (e - 1) / 50)) / 2, rel=1e-12)
    lrs = [lr_at(e, t) for e in range(1, 50)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0


def test_lr_at_constant_and_no_warmup():
    t = TrainSpec(lr=0.01, epochs=5, schedule="constant", warmup_epochs=2, warmup_lr=1e-4)
    assert [lr_at(e, t) for e in range(5)] == [1e-4, 1e-4, 0.01, 0.01, 0.01]
    t = TrainSpec(lr=0.01, epochs=4, warmup_epochs=0)
    assert lr_at(0, t) == pytest.approx(0.01)
    assert lr_at(2, t) == pytest.approx(0.005)


# -------------------------------------------------------------- run setup


@pytest.fixture(scope="module")
def registry_m(world):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
        yield build_registry(*make_plugin_manager())  # not the process-wide one


def capturing(reg: Registry, store: dict) -> Registry:
    """A copy of ``reg`` whose open_clip and coop builders record what they built."""
    entries = {kind: dict(v) for kind, v in reg.entries.items()}
    backbone = entries["backbone"]["open_clip"]
    method = entries["method"]["coop"]

    def build_backbone(opts):
        bb = backbone.build(opts)
        store["backbones"].append(bb)
        store["backbone_before"].append({k: v.clone() for k, v in bb.state_dict().items()})
        image_dtypes = store["image_dtypes"]
        encode = bb.encode_image

        def encode_image(images):  # counts and records what the engine computes
            out = encode(images)
            image_dtypes.add(out.dtype)
            return out

        bb.encode_image = encode_image
        return bb

    def build_method(bb, classes, opts):
        m = method.build(bb, classes, opts)
        store["methods"].append(m)
        store["method_before"].append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        return m

    entries["backbone"]["open_clip"] = dataclasses.replace(backbone, build=build_backbone)
    entries["method"]["coop"] = dataclasses.replace(method, build=build_method)
    return Registry(entries=entries, sources=reg.sources, failures=reg.failures, pm=reg.pm)


def make_spec(world, registry, output, **train):
    data = {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "coop", "n_ctx": 4},
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        "train": {"epochs": 2, "batch_size": 4, "seeds": [1, 2], "device": "cpu", "precision": "fp32", **train},
        "output": str(output),
    }
    return validate_spec(data, registry)


def run(world, registry, output, **train):
    store = {k: [] for k in ("backbones", "backbone_before", "methods", "method_before")}
    store["image_dtypes"] = set()
    store["log"] = []
    reg = capturing(registry, store)
    spec = make_spec(world, reg, output, **train)
    store["spec"] = spec
    store["record"] = Engine(spec, reg, log=lambda line: line.startswith("kernels:") or store["log"].append(line)).run()
    store["output"] = output
    return store


@pytest.fixture(scope="module")
def main_run(world, registry_m, tmp_path_factory):
    return run(world, registry_m, tmp_path_factory.mktemp("engine") / "out")


# ------------------------------------------------------------- the backbone


def test_backbone_is_bit_identical_after_training(main_run):
    (bb,) = main_run["backbones"]
    (before,) = main_run["backbone_before"]
    after = bb.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(not p.requires_grad and p.grad is None for p in bb.parameters())
    assert not any(m.training for m in bb.modules())


def test_only_trainable_params_change(main_run):
    assert len(main_run["methods"]) == 2  # one per seed
    for m, before in zip(main_run["methods"], main_run["method_before"]):
        trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
        assert list(trainable) == ["ctx"]
        assert list(before) == ["ctx"]
        assert not torch.equal(trainable["ctx"].detach(), before["ctx"])
        assert trainable["ctx"].dtype == torch.float32
        # the shared backbone is not the method's: it holds no other parameter
        assert [n for n, _ in m.named_parameters()] == ["ctx"] and m.backbone is main_run["backbones"][0]


# --------------------------------------------------------------- checkpoint


def test_checkpoint_holds_exactly_the_trainable_params(main_run):
    for m, r in zip(main_run["methods"], main_run["record"]["runs"]):
        ckpt = load_file(main_run["output"] / r["checkpoint"])
        assert set(ckpt) == {"ctx"}
        assert ckpt["ctx"].dtype == torch.float32
        assert torch.equal(ckpt["ctx"], m.ctx.detach())
        assert r["cost"]["trainable_parameters"] == m.ctx.numel() == 4 * 32


# ------------------------------------------------------------------ results


def test_results_json_is_complete(main_run):
    out = main_run["output"]
    on_disk = json.loads((out / "results.json").read_text())
    record = main_run["record"]
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["status"] == "complete"
    assert on_disk["spec"] == main_run["spec"].model_dump(mode="json")
    assert on_disk["spec"]["method"][0]["n_ctx"] == 4
    versions = on_disk["versions"]
    for dist in ("vlprompt", "torch", "open_clip_torch", "vlprompt-plugin-coop"):
        assert versions[dist] == package_versions(["vlprompt-plugin-coop"])[dist]
    assert on_disk["device"] == "cpu"

    runs = on_disk["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("coop", 1), ("coop", 2)]
    for r in runs:
        acc = r["accuracy"]["test"]
        assert 0 <= acc <= 100
        assert round(acc * N_TEST / 100, 6).is_integer()  # a whole number of the 18 test images
        assert r["summary"] == {"accuracy": acc}
        assert [e["epoch"] for e in r["epochs"]] == [0, 1]
        assert [e["lr"] for e in r["epochs"]] == [pytest.approx(1e-5), pytest.approx(0.002)]
        assert all(math.isfinite(e["loss"]) and e["loss"] > 0 for e in r["epochs"])

    accs = [r["accuracy"]["test"] for r in runs]
    mean = sum(accs) / 2
    summary = on_disk["summary"]["coop"]["accuracy"]
    assert summary["mean"] == pytest.approx(mean)
    assert summary["std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 2))
    assert summary["n"] == 2

    sample = json.loads((out / "fewshot" / "seed1.json").read_text())
    assert len(sample["train"]) == 6 * 2 and len(sample["val"]) == 6 * 2


def test_rerun_skips_finished_pairs(world, registry_m, main_run):
    first = json.loads((main_run["output"] / "results.json").read_text())
    again = run(world, registry_m, main_run["output"])
    assert again["methods"] == []  # nothing was built, let alone trained
    assert len(again["log"]) == 2 and all("skipped" in line for line in again["log"])
    assert again["record"]["runs"] == first["runs"]
    assert again["record"]["summary"] == first["summary"]
    assert again["record"]["status"] == "complete"


def test_results_of_another_spec_are_moved_aside_not_lost(world, registry_m, tmp_path):
    out = tmp_path / "shared"
    first = run(world, registry_m, out, seeds=[1], epochs=1)
    old_hash = first["record"]["spec_hash"]
    second = run(world, registry_m, out, seeds=[1], epochs=2)
    assert second["record"]["spec_hash"] != old_hash
    assert len(second["methods"]) == 1  # trained anew, not skipped
    aside = json.loads((out / f"results.{old_hash}.json").read_text())
    assert aside["runs"] == first["record"]["runs"]
    assert any("moved to" in line for line in second["log"])


# --------------------------------------------------------- reproducibility


def test_same_seed_same_checkpoint(world, registry_m, main_run, tmp_path):
    alone = run(world, registry_m, tmp_path / "seed1", seeds=[1])
    (r,) = alone["record"]["runs"]
    first, second = main_run["record"]["runs"]
    new = load_file(tmp_path / "seed1" / r["checkpoint"])["ctx"]
    assert torch.equal(new, load_file(main_run["output"] / first["checkpoint"])["ctx"])
    assert not torch.equal(new, load_file(main_run["output"] / second["checkpoint"])["ctx"])
    assert r["accuracy"] == first["accuracy"]
    assert [e["loss"] for e in r["epochs"]] == [e["loss"] for e in first["epochs"]]


# ---------------------------------------------------------------------- bf16


def test_bf16_runs_on_cpu_and_keeps_params_fp32(world, registry_m, main_run, tmp_path):
    bf = run(world, registry_m, tmp_path / "bf16", seeds=[1], precision="bf16")
    assert torch.bfloat16 in bf["image_dtypes"]  # autocast was really on
    assert torch.float32 not in bf["image_dtypes"]
    assert main_run["image_dtypes"] == {torch.float32}
    (m,) = bf["methods"]
    assert m.ctx.dtype == torch.float32
    (r,) = bf["record"]["runs"]
    ckpt = load_file(tmp_path / "bf16" / r["checkpoint"])
    assert set(ckpt) == {"ctx"} and ckpt["ctx"].dtype == torch.float32
    assert not torch.equal(ckpt["ctx"], bf["method_before"][0]["ctx"])
    assert 0 <= r["accuracy"]["test"] <= 100
    assert all(math.isfinite(e["loss"]) for e in r["epochs"])
