"""Records that can be trusted (issue 20, points 1, 4, 13, 14): a rerun keeps every
method section apart and never rewrites what an earlier run recorded; labels and seeds
that would pool rows are refused; a sweep never puts two runs in one folder and one
sweep at a time writes an output folder; files written atomically honour the umask,
checkpoints of identical runs are identical bytes, and the results key holds the
device and precision a pair really computes with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from vlprompt_core.engine import Engine
from vlprompt_core.errors import UserError
from vlprompt_core.lock import FolderLock
from vlprompt_core.spec import check_spec, resolve_methods, validate_spec
from vlprompt_core.sweep import SweepSpec, expand, run_sweep


def spec_data(world, output, method, **train):
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method,
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 1},
        "train": {"epochs": 1, "batch_size": 4, "seeds": [1], "device": "cpu", **train},
        "output": str(output),
    }


def run(registry, data, logs=None):
    sink = logs if logs is not None else []
    return Engine(validate_spec(data, registry), registry,
                  log=lambda line: line.startswith("kernels:") or sink.append(line)).run()


# -- 1. a rerun keeps sections that share a key apart ------------------------------------

def test_a_rerun_keeps_sections_that_share_a_results_key_apart(world, registry, tmp_path):
    """``text_chunk`` is left out of the key: two sections differing only in it share a key."""
    out = tmp_path / "out"
    sections = [{"name": "coop", "n_ctx": 2, "label": "chunk0", "train": {"text_chunk": 0}},
                {"name": "coop", "n_ctx": 2, "label": "chunkauto"}]
    first = run(registry, spec_data(world, out, sections))
    a, b = resolve_methods(validate_spec(spec_data(world, out, sections), registry), registry)
    assert a.key == b.key
    assert {label: s["accuracy"]["n"] for label, s in first["summary"].items()} == {"chunk0": 1, "chunkauto": 1}
    logs: list[str] = []
    again = run(registry, spec_data(world, out, sections), logs)
    assert logs == [f"{label} seed 1: already in {out / 'results.json'}, skipped" for label in ("chunk0", "chunkauto")]
    assert again["summary"] == first["summary"]
    assert again["runs"] == first["runs"]  # each pair as it was recorded

    # a third section of the same key is a section of its own: it trains, the others stay as they were
    logs.clear()
    more = run(registry, spec_data(world, out, [*sections, {"name": "coop", "n_ctx": 2, "label": "third"}]), logs)
    assert not any(line.startswith("third seed 1: already") for line in logs)
    assert [r["method"] for r in more["runs"]] == ["chunk0", "chunkauto", "third"]
    assert more["runs"][:2] == first["runs"]
    assert not list(out.glob("results.*.json"))  # nothing of it had to be set aside

    # renamed, a section keeps its result under its new name; the record of the old name is kept aside
    logs.clear()
    renamed = run(registry, spec_data(world, out, [sections[0], {**sections[1], "label": "auto"}]), logs)
    assert [r["method"] for r in renamed["runs"]] == ["chunk0", "auto"]
    assert renamed["runs"][1] == {**first["runs"][1], "method": "auto"}
    assert "auto seed 1: already in" in "\n".join(logs)
    (aside,) = out.glob("results.*.json")
    assert json.loads(aside.read_text())["runs"] == more["runs"]  # the earlier record, unchanged


# -- 4. labels that collide, repeated seeds ---------------------------------------------

@pytest.mark.parametrize("methods, label", [
    ([{"name": "coop"}, {"name": "coop"}, {"name": "coop", "label": "coop#2"}], "coop#2"),
    ([{"name": "coop", "label": "coop#2"}, {"name": "coop"}, {"name": "coop"}], "coop#2"),
    ([{"name": "zeroshot", "label": "CoOp"}, {"name": "coop"}], "coop"),  # one file where case is ignored
    ([{"name": "coop", "label": "mine"}, {"name": "cocoop", "label": "mine#2"}, {"name": "coop", "label": "mine"}],
     "mine#2"),
    ([{"name": "coop", "label": "a b"}, {"name": "coop", "label": "a_b"}], "a_b"),  # one checkpoint file name
])
def test_labels_that_collide_are_refused(world, registry, tmp_path, methods, label):
    data = spec_data(world, tmp_path / "out", methods)
    spec = validate_spec(data, registry)
    with pytest.raises(UserError) as exc:
        check_spec(spec, registry)
    (line,) = exc.value.problems
    assert line.startswith("spec: method") and repr(label) in line and "label" in line
    with pytest.raises(UserError):  # and so by run
        Engine(spec, registry)
    assert not (tmp_path / "out").exists()


def test_repeated_seeds_are_refused(world, registry, tmp_path):
    with pytest.raises(UserError) as exc:
        validate_spec(spec_data(world, tmp_path / "out", {"name": "zeroshot"}, seeds=[1, 2, 1, 1]), registry)
    (line,) = exc.value.problems
    assert line.startswith("spec: train.seeds:") and "1" in line and "once" in line


def test_validate_says_so_in_one_line_and_exits_2(world, registry, tmp_path):
    from typer.testing import CliRunner

    from vlprompt_core.cli import app

    for methods, seeds in (([{"name": "zeroshot"}, {"name": "zeroshot"}, {"name": "zeroshot", "label": "zeroshot#2"}],
                            [1]),
                           ({"name": "zeroshot"}, [3, 3])):
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec_data(world, tmp_path / "out", methods, seeds=seeds)))
        for command in ("validate", "run"):
            result = CliRunner().invoke(app, [command, str(path)], env={"COLUMNS": "400"})
            assert result.exit_code == 2, result.output
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not (tmp_path / "out").exists()


# -- 13. sweeps: one folder per run, one sweep per output ----------------------------------

def test_sweep_runs_never_share_a_folder(registry, tmp_path):
    base = {"backbone": {"name": "open_clip", "model": "vlprompt_tiny", "pretrained": None},
            "method": {"name": "coop"}, "dataset": {"name": "embedded_objects"},
            "protocol": {"name": "few_shot", "shots": 1}, "train": {"epochs": 1, "seeds": [1]}}
    labels = ["x y", "x-y", "x-y_2", "X-Y", "x-y_3"]  # "x y" and "x-y" are both folder x-y
    sweep = SweepSpec(spec=base, grid={"method": [{"name": "coop", "label": v} for v in labels]},
                      name="{method}", output=tmp_path)
    folders = [r.folder for r in expand(sweep, registry)]
    assert len({f.casefold() for f in folders}) == len(labels), folders  # apart on any file system
    assert folders[0] == "x-y" and folders[2] == "x-y_2" and folders[4] == "x-y_3"  # a name of its own stays


class _Recorder:
    name = "test"

    def __init__(self):
        self.ran = []

    def run(self, runs, on_done, progress=None):
        self.ran += [r.folder for r in runs]


def test_a_second_sweep_on_a_busy_output_is_refused(registry, tmp_path):
    base = {"backbone": {"name": "open_clip", "model": "vlprompt_tiny", "pretrained": None},
            "method": {"name": "zeroshot"}, "dataset": {"name": "embedded_objects"},
            "protocol": {"name": "few_shot", "shots": 1}, "train": {"seeds": [1]}}
    sweep = SweepSpec(spec=base, grid={"protocol.shots": [1, 2]}, output=tmp_path / "sweep")
    runs = expand(sweep, registry)
    executor = _Recorder()
    with FolderLock(tmp_path / "sweep"):  # another sweep at work on this output
        with pytest.raises(UserError) as exc:
            run_sweep(sweep, runs, executor, "s.yaml")
    (line,) = exc.value.problems
    assert "in use by process" in line and "sweep" in line
    assert executor.ran == [] and not (tmp_path / "sweep" / "sweep.json").exists()
    run_sweep(sweep, runs, executor, "s.yaml")  # once it is free
    assert executor.ran == ["shots-1", "shots-2"]


# -- 14. modes, checkpoint bytes, device and precision in the key -------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    from vlprompt_core.features import Features, FeatureStore
    from vlprompt_core.results import atomic_write_json
    from vlprompt_core.trainstate import atomic_save

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        atomic_save({"x": torch.ones(2)}, tmp_path / "c.safetensors", {"m": "1"})
        store = FeatureStore(tmp_path / "cache")
        store._save("k", "test", Features(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), {}))
        plain = tmp_path / "plain"
        plain.write_text("x")
    finally:
        os.umask(old)
    want = plain.stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for path in (tmp_path / "r.json", tmp_path / "c.safetensors", *(tmp_path / "cache").iterdir()):
        assert path.stat().st_mode & 0o777 == want, path


SAVE = """
import sys, torch
from pathlib import Path
from vlprompt_core.trainstate import atomic_save
def save(path):
    tensors = {"b": torch.arange(6.).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16),
               "c": torch.zeros(2, dtype=torch.int64)}
    atomic_save(tensors, Path(path), {f"key{i}": f"value {i}" for i in range(16)} | {"é": "ü"})
"""


def test_identical_tensors_and_metadata_are_identical_bytes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vlprompt_core.trainstate import atomic_save

    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    # two processes, each with its own hash order: a new one, and this one
    subprocess.run([sys.executable, "-c", SAVE + "save(sys.argv[1])", str(paths[0])], check=True)
    saved: dict = {}
    exec(SAVE, saved)  # noqa: S102 - the very code the other process ran
    saved["save"](paths[1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    meta = {f"key{i}": f"value {i}" for i in range(16)} | {"é": "ü"}
    tensors = load_file(paths[0])
    again = [tmp_path / f"in{i}.safetensors" for i in range(3)]
    for path in again:  # and in one process
        atomic_save(tensors, path, meta)
    assert {p.read_bytes() for p in again} == {paths[0].read_bytes()}
    with safe_open(str(paths[0]), "pt") as f:  # still a safetensors file with all it held
        assert f.metadata() == meta
    assert all(tensors[k].equal(t) for k, t in load_file(again[0]).items())
    assert (len(paths[0].read_bytes()[:8]) == 8 and
            int.from_bytes(paths[0].read_bytes()[:8], "little") % 8 == 0)  # data stays 8-byte aligned


def test_identical_runs_write_identical_checkpoints(world, registry, tmp_path):
    records = [run(registry, spec_data(world, tmp_path / name, {"name": "coop", "n_ctx": 2})) for name in "ab"]
    a, b = ((tmp_path / name / rec["runs"][0]["checkpoint"]).read_bytes() for name, rec in zip("ab", records))
    assert a == b


def test_the_results_key_holds_the_device_type_and_the_precision_computed_with(world, registry, tmp_path,
                                                                                monkeypatch):
    def key(**train) -> str:
        (m,) = resolve_methods(validate_spec(spec_data(world, tmp_path, {"name": "coop"}, **train), registry),
                               registry)
        return m.key

    cpu = key(device="cpu")
    assert key(device="cpu", precision="fp32") == cpu  # what auto means there
    assert key(device="cpu", precision="bf16") != cpu
    cuda = key(device="cuda")  # keyed without a GPU here, as validate does on a login node
    assert cuda != cpu and key(device="cuda:1") == cuda
    assert key(device="cuda", precision="bf16") == cuda and key(device="cuda", precision="fp32") != cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert key(device="auto") == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert key(device="auto") == cuda
