"""Using what was trained (issue 24): ``vlprompt predict``, ``vlprompt.load`` and
``vlprompt export`` on the embedded world give the run's own predictions; CoOp scores
other class names, class-specific CoOp refuses; every bad input is one line, exit 2.

Two tiny runs are trained once for the module (base-to-novel CoOp and zero-shot;
few-shot class-specific CoOp); the CLI is called in-process, except where a fresh
process is the point (an exported file loaded elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import vlprompt
from vlprompt_core.api import ProtocolContext
from vlprompt_core.engine import Engine
from vlprompt_core.errors import UserError
from vlprompt_core.inference.exported import digest
from vlprompt_core.plugins import get_registry
from vlprompt_core.spec import validate_spec


def spec(output: Path, methods: list[dict], protocol: dict) -> dict:
    """A run on the embedded world; its test features kept in a feature cache beside
    ``output`` (the runs of the module and ``eval`` share them: they are computed once)."""
    return {
        "backbone": {"name": "open_clip", "model": "vlprompt_tiny", "pretrained": "embedded"},
        "method": methods,
        "dataset": {"name": "embedded_objects_closeup"},
        "protocol": protocol,
        "train": {"epochs": 2, "batch_size": 32, "crop_scale": [0.8, 1.0], "seeds": [1], "device": "cpu",
                  "feature_cache": str(output.parent / "feature-cache")},
        "output": str(output),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The embedded dataset in a data root of the module's own, two trained folders:
    ``b2n`` (zero-shot and CoOp, base-to-novel) and ``csc`` (class-specific CoOp, few-shot),
    and each evaluation split of ``b2n`` with its classes."""
    tmp = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATA", str(tmp / "data"))
        reg = get_registry(refresh=True)
        b2n = spec(tmp / "b2n", [{"name": "zeroshot"}, {"name": "coop", "n_ctx": 4}],
                   {"name": "base2novel", "shots": 4})
        csc = spec(tmp / "csc", [{"name": "coop", "label": "csc", "n_ctx": 4, "csc": True}],
                   {"name": "few_shot", "shots": 1})
        record = Engine(validate_spec(b2n, reg), reg).run()
        assert record["status"] == "complete"
        assert Engine(validate_spec(csc, reg), reg).run()["status"] == "complete"
        run_spec = validate_spec(b2n, reg)
        dataset = reg.get("dataset", "embedded_objects_closeup").load(run_spec.dataset)
        plan = reg.get("protocol", "base2novel").plan(run_spec.protocol, ProtocolContext(dataset, 1, None))
        yield {"tmp": tmp, "b2n": tmp / "b2n", "csc": tmp / "csc", "spec": b2n, "record": record,
               "evals": {e.name: e for e in plan.evals}, "data": tmp / "data"}


def cli(*args: str):
    from vlprompt_core.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def accuracy(indices: list[int], items) -> float:
    return 100.0 * sum(i == it.label for i, it in zip(indices, items)) / len(items)


def predicted(result) -> list[str]:
    """The top class of each image in ``predict --format json`` output."""
    assert result.exit_code == 0, result.output
    return [p["top"][0]["class"] for p in json.loads(result.stdout)["predictions"]]


def refused(result, *words: str) -> str:
    """One ``error:`` line, exit code 2, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def run_accuracy(world, label: str, split: str) -> float:
    return next(r for r in world["record"]["runs"] if r["method"] == label)["accuracy"][split]


# ------------------------------------------------------ the run's predictions


def test_predict_gives_the_runs_accuracy_and_eval_agrees(world, tmp_path):
    """CoOp's base accuracy over the classes it trained on, its novel accuracy over
    the novel class names given with --classes (a file), as the run and eval score them."""
    base, novel = world["evals"]["base"], world["evals"]["novel"]
    names = predicted(cli("predict", world["b2n"], *[it.path for it in base.items], "-m", "coop", "-f", "json"))
    got_base = accuracy([base.classes.names.index(n) for n in names], base.items)
    classes_file = tmp_path / "novel.txt"
    classes_file.write_text("# the novel half\n" + "\n".join(novel.classes.names) + "\n")
    names = predicted(cli("predict", world["b2n"], *[it.path for it in novel.items], "-m", "coop", "--classes",
                          classes_file, "-f", "json"))
    got_novel = accuracy([novel.classes.names.index(n) for n in names], novel.items)
    assert (got_base, got_novel) == (run_accuracy(world, "coop", "base"), run_accuracy(world, "coop", "novel"))

    spec_file = tmp_path / "eval.yaml"
    spec_file.write_text(yaml.safe_dump({**world["spec"], "method": [{"name": "coop", "n_ctx": 4}],
                                         "output": str(tmp_path / "scored")}))
    result = cli("eval", spec_file, "--from", world["b2n"])
    assert result.exit_code == 0, result.output
    (scored,) = json.loads((tmp_path / "scored" / "results.json").read_text())["runs"]
    assert scored["accuracy"] == {"base": got_base, "novel": got_novel}


def test_the_python_api_predicts_as_the_cli_from_paths_pil_images_and_tensors(world):
    base = world["evals"]["base"]
    paths = [it.path for it in base.items[:40]]
    from_cli = predicted(cli("predict", world["b2n"], *paths, "--method", "coop", "--seed", "1", "-f", "json"))
    clf = vlprompt.load(world["b2n"], method="coop", seed=1)
    assert clf.classes == base.classes.names and clf.to("cpu") is clf
    got = clf.predict(paths)
    assert got.names == from_cli and got.sources == [str(p) for p in paths]
    assert got.scores.shape == (40, len(clf.classes)) and torch.allclose(got.scores.sum(-1), torch.ones(40))
    pil = [Image.open(p).convert("RGB") for p in paths]
    assert clf.predict(pil).names == from_cli
    from torchvision.transforms.functional import pil_to_tensor

    pixels = torch.stack([pil_to_tensor(im) for im in pil])  # uint8 [N, 3, H, W]
    assert clf.predict(pixels).names == from_cli
    assert torch.allclose(clf.predict(pixels).scores, got.scores, atol=1e-4)


def test_text_features_are_the_classifier_and_follow_other_class_names(world):
    clf = vlprompt.load(world["b2n"], method="coop")
    text = clf.text_features()
    assert text.shape[0] == len(clf.classes) and torch.allclose(text.norm(dim=-1), torch.ones(len(text)))
    other = clf.text_features(["red circle", "a purple elephant", "a cloud"])
    assert other.shape[0] == 3 and torch.allclose(other[0], text[0], atol=1e-5)
    assert len(clf.classes) == 16  # asking for other names does not change the classifier's classes
    feats = clf.backbone.encode_image(torch.stack([clf.transform(Image.open(it.path).convert("RGB"))
                                                   for it in world["evals"]["base"].items[:8]]))
    by_hand = (torch.nn.functional.normalize(feats, dim=-1) @ text.T).argmax(-1).tolist()
    assert by_hand == clf.predict([it.path for it in world["evals"]["base"].items[:8]]).indices


def test_an_exported_file_predicts_the_same_in_a_fresh_process(world, tmp_path):
    out = tmp_path / "coop.safetensors"
    result = cli("export", world["b2n"], "--method", "coop", "--seed", "1", "-o", out)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "coop.md").read_text()
    for words in ("# coop: coop on embedded_objects_closeup", "base2novel", "vlprompt_tiny", "| base | "
                  f"{run_accuracy(world, 'coop', 'base'):.2f}", "## Recipe", "## Versions", "torch"):
        assert words in card, words

    paths = [str(it.path) for it in world["evals"]["base"].items]
    code = ("import json, sys, vlprompt; clf = vlprompt.load(sys.argv[1]); "
            "print(json.dumps([clf.classes, clf.predict(sys.argv[2:]).names]))")
    env = {**os.environ, "VLPROMPT_DATA": str(tmp_path / "no-data-here")}  # the file alone suffices
    proc = subprocess.run([sys.executable, "-c", code, str(out), *paths], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    classes, names = json.loads(proc.stdout)
    clf = vlprompt.load(world["b2n"], method="coop")
    assert classes == clf.classes and names == clf.predict(paths).names
    assert accuracy([classes.index(n) for n in names], world["evals"]["base"].items) == run_accuracy(
        world, "coop", "base")
    with safe_open(str(out), "pt") as f:  # the class text features are in the file, for use without vlprompt
        assert torch.allclose(f.get_tensor("text_features"), clf.text_features(), atol=1e-6)
    assert predicted(cli("predict", out, *paths[:10], "-f", "json")) == names[:10]


def test_zero_shot_works_from_the_results_the_api_and_an_export(world, tmp_path):
    novel = world["evals"]["novel"]
    paths = [it.path for it in novel.items]
    clf = vlprompt.load(world["b2n"], method="zeroshot", classes=novel.classes.names)  # no checkpoint
    got = clf.predict(paths)
    assert accuracy(got.indices, novel.items) == run_accuracy(world, "zeroshot", "novel")
    assert predicted(cli("predict", world["b2n"], *paths[:20], "-m", "zeroshot", "--classes",
                         ",".join(novel.classes.names), "-f", "json")) == got.names[:20]
    vlprompt.export(world["b2n"], tmp_path / "zs.safetensors", method="zeroshot")
    again = vlprompt.load(tmp_path / "zs.safetensors", classes=novel.classes.names)
    assert again.predict(paths).names == got.names


# ----------------------------------------------------------- other classes


def test_coop_scores_new_class_names(world, tmp_path):
    image = world["evals"]["base"].items[0].path  # a red circle
    result = cli("predict", world["b2n"], image, "-m", "coop", "--classes", "red circle, blue square,a green star",
                 "--top-k", "3", "-f", "csv")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.strip().splitlines()
    assert header == "path,class_1,score_1,class_2,score_2,class_3,score_3"
    cells = row.split(",")
    assert cells[0] == str(image) and cells[1] == "red circle"
    assert sorted(cells[1::2][1:]) == ["a green star", "blue square"]
    table = cli("predict", world["b2n"], image, "-m", "coop", "--classes", "red circle,blue square")
    assert table.exit_code == 0 and "red circle" in table.stdout and "2 classes" in table.stdout


def test_class_specific_coop_predicts_its_own_classes_and_refuses_others_in_one_line(world):
    image = world["evals"]["base"].items[0].path
    (name,) = predicted(cli("predict", world["csc"], image, "-f", "json"))  # its own 32 classes
    assert name in vlprompt.load(world["csc"]).classes
    refused(cli("predict", world["csc"], image, "--classes", "red circle,blue square"),
            "csc", "class-specific context", "cannot score other classes")
    clf = vlprompt.load(world["csc"])
    with pytest.raises(UserError, match="class-specific"):
        clf.set_classes(["a", "b"])
    assert len(clf.classes) == 32  # still its own


# -------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def exported(world):
    out = world["tmp"] / "export" / "coop.safetensors"
    vlprompt.export(world["b2n"], out, method="coop")
    return out


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of an export whose metadata ``change`` edits, with its checksum made again
    (so only what was changed is wrong)."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head = json.loads(meta["vlprompt"])
    change(head)
    meta["vlprompt"] = json.dumps(head)
    meta["sha256"] = digest(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_unreadable_images_stop_or_are_skipped_by_name(world, tmp_path):
    good = world["evals"]["base"].items[0].path
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    refused(cli("predict", world["b2n"], good, bad, "-m", "coop"), str(bad), "cannot read image", "--unreadable skip")
    result = cli("predict", world["b2n"], good, bad, "-m", "coop", "--unreadable", "skip", "-o", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert f"skipped: {bad}: cannot read image" in result.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    assert [p["path"] for p in data["predictions"]] == [str(good)]
    assert data["unreadable"][0]["path"] == str(bad)

    skipping = tmp_path / "skipping"  # a run with 'train: {unreadable_images: skip}' skips by default
    shutil.copytree(world["b2n"], skipping)
    record = json.loads((skipping / "results.json").read_text())
    record["methods"]["coop"]["train"]["unreadable_images"] = "skip"
    (skipping / "results.json").write_text(json.dumps(record))
    result = cli("predict", skipping, good, bad, "-m", "coop", "-f", "csv")
    assert result.exit_code == 0, result.output
    assert f"skipped: {bad}: cannot read image" in result.stderr
    assert [row.split(",")[0] for row in result.stdout.splitlines()[1:]] == [str(good)]


def test_a_folder_of_images_is_every_image_file_in_it(world, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    items = world["evals"]["base"].items[:3]
    for i, it in enumerate(items):
        shutil.copy(it.path, folder / ("sub" if i else "") / f"{i}.png")
    (folder / "README.txt").write_text("not an image: not taken")
    result = cli("predict", world["b2n"], folder, "-m", "coop", "-f", "csv")
    assert result.exit_code == 0, result.output
    assert [row.split(",")[0] for row in result.stdout.splitlines()[1:]] == [
        str(folder / "0.png"), str(folder / "sub" / "1.png"), str(folder / "sub" / "2.png")]


@pytest.mark.parametrize("case", ["missing folder", "folder without results", "wrong method label",
                                  "several methods, none chosen", "wrong seed", "missing image", "non-image file",
                                  "tampered export", "mismatched backbone", "a run's checkpoint",
                                  "not an export", "one class"])
def test_bad_input_is_one_line_and_exit_2(world, exported, tmp_path, case):
    image = world["evals"]["base"].items[0].path
    source, args, words = world["b2n"], ["-m", "coop"], []
    if case == "missing folder":
        source, words = tmp_path / "nowhere", ["no such folder or file"]
    elif case == "folder without results":
        source, words = tmp_path, ["no results.json"]
    elif case == "wrong method label":
        args, words = ["-m", "cop"], ["no method labelled 'cop'", "zeroshot, coop"]
    elif case == "several methods, none chosen":
        args, words = [], ["zeroshot, coop", "--method"]
    elif case == "wrong seed":
        args, words = ["-m", "coop", "--seed", "7"], ["no coop seed 7", "seeds 1"]
    elif case == "missing image":
        image, words = tmp_path / "gone.png", ["gone.png: no such file or folder"]
    elif case == "non-image file":
        image = tmp_path / "data.png"
        image.write_bytes(b"\x89PNG but not really")
        words = [str(image), "cannot read image"]
    elif case == "tampered export":
        source, args = tmp_path / "tampered.safetensors", []
        raw = bytearray(exported.read_bytes())
        raw[-2] ^= 0xFF  # a byte of the trained tensors
        source.write_bytes(bytes(raw))
        words = ["does not match the checksum", "export it again"]
    elif case == "mismatched backbone":
        source, args = rewrite(exported, tmp_path / "other.safetensors",
                               lambda head: head.update(backbone_sha256="0" * 64)), []
        words = ["weights hash to 0000000000000000", "the one built here hashes to", "use the backbone"]
    elif case == "a run's checkpoint":
        source, args = next((world["b2n"] / "checkpoints").glob("coop-*.safetensors")), []
        words = ["a checkpoint of a run, not an export"]
    elif case == "not an export":
        source, args = tmp_path / "x.safetensors", []
        source.write_text("hello")
        words = ["not a file 'vlprompt export' wrote"]
    elif case == "one class":
        args, words = ["-m", "coop", "--classes", "cat"], ["1 class", "at least 2"]
    refused(cli("predict", source, image, *args), *words)
    if case in ("missing folder", "wrong method label", "tampered export", "mismatched backbone"):
        with pytest.raises(UserError):
            vlprompt.load(source, method=None if source != world["b2n"] else "cop")


def test_export_refuses_in_one_line_too(world, tmp_path):
    refused(cli("export", world["b2n"], "-m", "nope", "-o", tmp_path / "x.safetensors"), "no method labelled 'nope'")
    refused(cli("export", world["b2n"], "-o", tmp_path / "x.safetensors"), "choose one (--method)")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ README

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### Using what was trained"


def test_the_readme_python_example_runs(world, tmp_path, monkeypatch):
    """The README's Python example, run where ``runs/quickstart`` holds a CoOp run on the
    quickstart's dataset and protocol (seed 1), as `vlprompt run examples/quickstart.yaml` leaves it."""
    text = README.read_text()
    if SECTION not in text:
        pytest.skip(f"README.md has no {SECTION!r} section yet")
    code = text.split(SECTION, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copytree(world["b2n"], tmp_path / "runs" / "quickstart")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["text"].shape[0] == 3
    assert namespace["clf"].classes == world["evals"]["base"].classes.names  # the export: the classes it trained on
    assert (tmp_path / "coop.safetensors").is_file() and (tmp_path / "coop.md").is_file()
