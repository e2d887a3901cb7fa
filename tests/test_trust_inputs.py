"""What a run reads or produces is checked before a number is reported from it:
trainable tensors that diverge (non-finite or exploded) and non-finite scores fail
the pair; ``eval --from`` scores only checkpoints that carry what they were trained
as, hold finite values and lie inside the folder given; a feature-cache entry that
fails its integrity check (checksum, rows, labels) is computed again and replaced."""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from toy_methods import Plugin as Toys
from vlprompt_core import hookimpl
from vlprompt_core.api import MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.engine import Engine
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.prompting import class_text_features
from vlprompt_core.spec import validate_spec
from vlprompt_kernels import cosine_logits

# ------------------------------------------------------------------ helpers


class ScaleOptions(Options):
    nan_scores: bool = False
    nan_grad: bool = False


class Scale(PromptMethod):
    """One trained scale on a frozen zero-shot classifier; with ``nan_scores`` its
    scores are NaN outside training, with ``nan_grad`` its gradient is NaN (its loss
    stays finite either way)."""

    def __init__(self, backbone, classes, options):
        super().__init__(backbone, classes, options)
        self.scale = torch.nn.Parameter(torch.ones(()))
        if options.nan_grad:
            self.scale.register_hook(lambda grad: grad * float("nan"))
        self.set_classes(classes)

    def set_classes(self, classes):
        self.text = class_text_features(self.backbone, classes.names, classes.templates[:1])

    def forward(self, batch):
        logits = self.scale * cosine_logits(batch.image_features.float(), self.text, 10.0)
        if self.options.nan_scores and not self.training:
            logits = logits * float("nan")
        return MethodOutput(logits)


class Scales:
    @hookimpl
    def vlprompt_methods(self):
        return [MethodEntry("toy_scale", ScaleOptions, Scale, "a trained scale")]


def registry(world):
    """The registry with the toy methods and the test datasets: built once per world for
    the module (it holds what is registered, nothing of a run)."""
    os.environ["VLPROMPT_DATASETS_SPEC"] = str(world["specs"])
    return _registry(str(world["specs"]))


@functools.cache
def _registry(specs: str):
    return build_registry(*make_plugin_manager(extra=(("toys", Toys()), ("scales", Scales()))))


def spec(world, output, method, protocol=None, **train):
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method,
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": protocol or {"name": "few_shot", "shots": 2},
        "train": {"epochs": 1, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32", **train},
        "output": str(output),
    }


def run(reg, data, logs=None, **kw):
    sink = logs if logs is not None else []
    return Engine(validate_spec(data, reg), reg,
                  log=lambda line: line.startswith("kernels:") or sink.append(line)).run(**kw)


def cli(reg, monkeypatch, *args):
    import vlprompt_core.plugins as plugins
    from vlprompt_core.cli import app

    monkeypatch.setattr(plugins, "_REGISTRY", reg)
    return CliRunner().invoke(app, list(args))


# ------------------------------------------- 5. divergence without a NaN loss

#: one batch of all 12 training images (6 classes x 2 shots), no warm-up: the first step is at ``lr``
BIG_STEP = {"batch_size": 12, "warmup_epochs": 0}


@pytest.mark.parametrize("method, lr, epochs, what", [
    ({"name": "coop", "n_ctx": 2}, 1e10, 1, "exploded"),  # prompts ~1e10: finite scores, below chance
    ({"name": "toy_scale"}, 1e30, 1, "exploded"),  # a scale of ~1e29: finite, reversed scores
    ({"name": "toy_scale", "nan_grad": True}, 0.002, 1, "became nan"),  # a NaN step after a finite loss
])
def test_trainable_tensors_that_diverge_fail_the_pair_as_a_non_finite_loss_does(world, tmp_path, method, lr,
                                                                                epochs, what):
    record = run(registry(world), spec(world, tmp_path / "o", [method, {"name": "zeroshot"}], lr=lr,
                                       epochs=epochs, **BIG_STEP))
    assert record["status"] == "failed"
    assert [r["method"] for r in record["runs"]] == ["zeroshot"]  # the other pairs go on
    (failure,) = record["failures"]
    assert (failure["method"], failure["seed"]) == (method["name"], 1)
    msg = failure["error"]
    assert msg.startswith(f"{method['name']} seed 1: ")
    assert what in msg and "in epoch 1 of" in msg and f"at learning rate {lr:g}" in msg and "lower train.lr" in msg


def test_a_sane_learning_rate_still_completes(world, tmp_path):
    record = run(registry(world), spec(world, tmp_path / "o", [{"name": "coop", "n_ctx": 2}, {"name": "toy_scale"}],
                                       lr=0.5, epochs=2, **BIG_STEP))
    assert record["status"] == "complete" and not record["failures"]


def test_non_finite_scores_fail_the_pair(world, tmp_path, monkeypatch):
    reg = registry(world)
    data = spec(world, tmp_path / "o", [{"name": "toy_scale", "nan_scores": True}, {"name": "zeroshot"}])
    record = run(reg, data)
    assert record["status"] == "failed" and [r["method"] for r in record["runs"]] == ["zeroshot"]
    (failure,) = record["failures"]
    msg = failure["error"]
    assert msg.startswith("toy_scale seed 1: ") and "not finite" in msg and "test" in msg
    assert "learning rate 0.002" in msg and "epoch" in msg

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump({**data, "output": str(tmp_path / "cli")}))
    result = cli(reg, monkeypatch, "run", str(spec_file))
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("failed:")] == [f"failed: {msg}"]


# ------------------------------------------------- 7. eval --from trusts nothing


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A folder with one trained CoOp pair (class token at the end)."""
    out = tmp_path_factory.mktemp("trained") / "train"
    run(registry(world), spec(world, out, {"name": "coop", "n_ctx": 2}))
    return out


def take(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained folder, and its checkpoint."""
    folder = tmp_path / "train"
    shutil.copytree(trained, folder)
    (run_,) = json.loads((folder / "results.json").read_text())["runs"]
    return folder, folder / run_["checkpoint"]


def eval_from(world, monkeypatch, tmp_path, folder, method=None):
    spec_file = tmp_path / "eval.yaml"
    spec_file.write_text(yaml.safe_dump(spec(world, tmp_path / "scored", method or {"name": "coop", "n_ctx": 2})))
    return cli(registry(world), monkeypatch, "eval", str(spec_file), "--from", str(folder))


def refused(result, file: Path, *words: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert errors[0].startswith(f"error: {file}: "), errors[0]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def test_eval_from_scores_an_untouched_checkpoint(world, trained, tmp_path, monkeypatch):
    folder, _ = take(trained, tmp_path)
    result = eval_from(world, monkeypatch, tmp_path, folder)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("strip, position", [("all", "front"), ("options", "front"), ("method", "end"),
                                             ("seed", "end")])
def test_eval_from_refuses_a_checkpoint_without_what_it_was_trained_as(world, trained, tmp_path, monkeypatch,
                                                                       strip, position):
    folder, ckpt = take(trained, tmp_path)
    meta = {} if strip == "all" else {k: v for k, v in metadata(ckpt).items() if k != strip}
    save_file(load_file(str(ckpt)), str(ckpt), metadata=meta or None)
    # the prompts were trained with the class token at the end; "front" is scored as another method
    result = eval_from(world, monkeypatch, tmp_path, folder,
                       {"name": "coop", "n_ctx": 2, "class_token_position": position})
    refused(result, ckpt, "trained")
    record = json.loads((tmp_path / "scored" / "results.json").read_text())
    assert record["status"] == "failed" and str(ckpt) in record["error"] and not record["runs"]


def test_eval_from_refuses_a_checkpoint_of_another_seed(world, trained, tmp_path, monkeypatch):
    folder, ckpt = take(trained, tmp_path)
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**metadata(ckpt), "seed": "7"})
    refused(eval_from(world, monkeypatch, tmp_path, folder), ckpt, "seed")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e30])
def test_eval_from_refuses_non_finite_or_exploded_prompts(world, trained, tmp_path, monkeypatch, value):
    folder, ckpt = take(trained, tmp_path)
    tensors = {k: torch.full_like(v, value) for k, v in load_file(str(ckpt)).items()}
    save_file(tensors, str(ckpt), metadata=metadata(ckpt))
    error = refused(eval_from(world, monkeypatch, tmp_path, folder), ckpt, "ctx")
    assert ("nan" if value != value else "inf" if abs(value) == float("inf") else "exploded") in error
    record = json.loads((tmp_path / "scored" / "results.json").read_text())
    assert record["status"] == "failed" and not record["runs"]  # nothing was scored


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_eval_from_takes_checkpoints_only_from_inside_the_folder_given(world, trained, tmp_path, monkeypatch, where):
    folder, ckpt = take(trained, tmp_path)
    outside = tmp_path / "elsewhere" / "checkpoints" / ckpt.name
    outside.parent.mkdir(parents=True)
    shutil.copy(ckpt, outside)  # a good checkpoint, but not in the folder given
    ckpt.unlink()
    results = folder / "results.json"
    record = json.loads(results.read_text())
    record["runs"][0]["checkpoint"] = str(outside) if where == "absolute" else f"../elsewhere/checkpoints/{ckpt.name}"
    results.write_text(json.dumps(record))
    refused(eval_from(world, monkeypatch, tmp_path, folder), results, "outside")


@pytest.mark.parametrize("shape", [{"runs": 5}, [1, 2], {"runs": [1, {"method": "coop", "seed": 1, "checkpoint": 3}]}])
def test_eval_from_refuses_results_of_the_wrong_shape(world, tmp_path, monkeypatch, shape):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(shape))
    refused(eval_from(world, monkeypatch, tmp_path, folder), folder / "results.json")


# ------------------------------------------------ 8. the feature cache is checked


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    data[8 + header + 5] ^= 0x10  # in the first tensor's bytes
    path.write_bytes(bytes(data))


def rewrite(path: Path, change, checksum: bool = False) -> None:
    """The entry's tensors changed by ``change``, written back with its metadata (and,
    with ``checksum``, the checksum of the new content, as a writer of bad content would)."""
    meta = metadata(path)
    tensors = change(load_file(str(path)))
    if checksum:
        from vlprompt_core.features import Features, content_hash

        meta["sha256"] = content_hash(Features(tensors["features"], tensors["labels"], json.loads(meta["unreadable"])))
    save_file(tensors, str(path), metadata=meta)


def half_the_rows(t):
    n = t["labels"].shape[0] // 2
    return {"features": t["features"][..., :n, :].clone(), "labels": t["labels"][:n].clone()}


CORRUPTIONS = {
    "flipped bit": flip_a_bit,
    "half the rows": lambda p: rewrite(p, half_the_rows),
    "half the rows, checksum rewritten": lambda p: rewrite(p, half_the_rows, checksum=True),
    "labels out of range, checksum rewritten": lambda p: rewrite(p, lambda t: {**t, "labels": t["labels"] + 6},
                                                                 checksum=True),
    "labels shuffled, checksum rewritten": lambda p: rewrite(p, lambda t: {**t, "labels": t["labels"].roll(1)},
                                                             checksum=True),
    "no checksum": lambda p: save_file(load_file(str(p)), str(p),
                                       metadata={k: v for k, v in metadata(p).items() if k != "sha256"}),
    "labels out of range": lambda p: rewrite(p, lambda t: {**t, "labels": t["labels"] + 100}),
    "labels shuffled": lambda p: rewrite(p, lambda t: {**t, "labels": t["labels"].roll(1)}),
    "labels as floats": lambda p: rewrite(p, lambda t: {**t, "labels": t["labels"].float()}),
    "features of the wrong rank": lambda p: rewrite(p, lambda t: {**t, "features": t["features"].reshape(-1)}),
}


def cached_run(world, reg, out: Path, cache: Path, views: int, log=lambda line: None) -> Engine:
    """CoOp on the toy data with its features cached in ``cache``: test features only
    (``views`` 0, no training), or train views too; the engine's messages to ``log``."""
    data = spec(world, out, {"name": "coop", "n_ctx": 2}, epochs=1 if views else 0, augment_views=views,
                feature_cache=str(cache))
    return Engine(validate_spec(data, reg), reg, log=log)


@pytest.fixture(scope="module")
def first_run(world, tmp_path_factory):
    """``first_run(views)``: the accuracies per seed of a :func:`cached_run` into an empty
    cache, and that cache (made once per ``views`` for the module: tests corrupt copies)."""
    made: dict[int, tuple[dict, Path]] = {}

    def first(views: int) -> tuple[dict, Path]:
        if views not in made:
            tmp = tmp_path_factory.mktemp(f"first-run-{views}-views")
            record = cached_run(world, registry(world), tmp / "out", tmp / "cache", views).run()
            made[views] = {r["seed"]: r["accuracy"] for r in record["runs"]}, tmp / "cache"
        return made[views]

    return first


@pytest.mark.parametrize("views", [0, 2], ids=["test features", "train views"])
@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_a_cache_entry_that_fails_its_integrity_check_is_computed_again_and_replaced(world, tmp_path, first_run,
                                                                                   corrupt, views):
    reg = registry(world)
    expected, first_cache = first_run(views)
    cache = tmp_path / "cache"
    shutil.copytree(first_cache, cache)  # the cache as the first run left it
    kind = "train views" if views else "features: test"
    entries = {}
    for p in cache.glob("*.safetensors"):
        entries[metadata(p)["kind"]] = p
    path = entries[kind]
    CORRUPTIONS[corrupt](path)

    lines: list[str] = []
    second = cached_run(world, reg, tmp_path / "b", cache, views, lines.append)
    assert {r["seed"]: r["accuracy"] for r in second.run()["runs"]} == expected
    assert (kind, "computed") in second.features.events
    said = [line for line in lines if line.startswith(f"{path}: ")]
    assert len(said) == 1 and "computing it again" in said[0] and "replac" in said[0], lines

    third = cached_run(world, reg, tmp_path / "c", cache, views)
    third.run()
    assert (kind, "disk") in third.features.events  # replaced by a whole entry
