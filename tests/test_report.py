"""``vlprompt report``: a small study of real tiny runs (few-shot, seeds in separate
folders, two shot counts) and hand-written results files (base-to-novel, cross-dataset,
a learning-rate sweep, a copy, an interrupted run, a corrupt file), reported through the
CLI in-process; numbers are checked against the results files."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vlprompt_core import hookimpl
from vlprompt_core.api import MethodEntry, Published
from vlprompt_core.builtin.zeroshot import ZeroShotCLIP, ZeroShotOptions
from vlprompt_core.engine import Engine
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.results import mean_std
from vlprompt_core.spec import validate_spec

DATASETS = {p.stem for p in (Path(__file__).resolve().parents[1] / "datasets_spec").glob("*.yaml")}
PAPER_ACCURACY = 50.0  # what the toy method "published" for toy, 1 shot


class PublishedToys:
    @hookimpl
    def vlprompt_methods(self):
        return [MethodEntry("toy_published", ZeroShotOptions, ZeroShotCLIP, "zero-shot CLIP with published numbers",
                            published=(Published("few_shot", "toy", {"accuracy": PAPER_ACCURACY}, shots=1,
                                                 backbone="tiny_test", source="made up for tests"),))]


@pytest.fixture(scope="module")
def registry(world):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
        yield build_registry(*make_plugin_manager(extra=(("published_toys", PublishedToys()),)))


def run_tiny(registry, world, output: Path, shots: int, seed: int) -> None:
    spec = validate_spec({
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": [{"name": "toy_published"}, {"name": "coop", "n_ctx": 2}],
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": shots},
        "train": {"epochs": 1, "batch_size": 4, "seeds": [seed]},
        "output": str(output),
    }, registry)
    Engine(spec, registry).run()


def pair(label: str, seed: int, summary: dict, key: str = "k", name: str | None = None, cost: dict | None = None):
    run = {"method": label, "name": name or label, "key": f"{key}-{label}", "seed": seed, "accuracy": {},
           "summary": summary, "epochs": [], "checkpoint": None}
    if cost is not None:
        run["cost"] = cost
    return run


def record(protocol: dict, dataset: str, runs: list[dict], status: str = "complete") -> dict:
    return {"status": status, "runs": runs,
            "spec": {"protocol": protocol, "dataset": {"name": dataset},
                     "backbone": {"name": "open_clip", "model": "ViT-B-16", "pretrained": "openai"}}}


def b2n(base: float, novel: float) -> dict:
    return {"base": base, "novel": novel, "H": 2 * base * novel / (base + novel)}


COST = {"time_s": {"build": 1.0, "train": 8.0, "eval": 1.0, "total": 10.0}, "peak_memory_mb": 900.0, "memory": "rss",
        "train_images_per_s": 50.0, "eval_images_per_s": 400.0, "trainable_parameters": 2048}
B2N = {"name": "base2novel", "shots": 16}
SYNTHETIC = {
    "b2n/dtd": record(B2N, "dtd", [pair("coop", 1, b2n(80.0, 50.0), cost=COST), pair("coop", 2, b2n(78.0, 54.0)),
                                   pair("cocoop", 1, b2n(76.0, 58.0))]),
    "b2n/eurosat": record(B2N, "eurosat", [pair("coop", 1, b2n(90.0, 60.0)), pair("cocoop", 1, b2n(88.0, 62.0))],
                          status="interrupted"),
    "xd": record({"name": "cross_dataset", "shots": 16, "targets": [{"name": "caltech101"}, {"name": "fgvc_aircraft"}]},
                 "imagenet", [pair("zs 100%", 1, {"imagenet (source)": 70.0, "caltech101": 90.0, "fgvc_aircraft": 20.0,
                                                  "average": 55.0})]),
    "sweep/lr0.1": record({"name": "few_shot", "shots": 4}, "eurosat", [pair("coop", 1, {"accuracy": 61.0}, key="a")]),
    "sweep/lr0.01": record({"name": "few_shot", "shots": 4}, "eurosat", [pair("coop", 1, {"accuracy": 66.0}, key="b")]),
}


@pytest.fixture(scope="module")
def study(tmp_path_factory, registry, world) -> Path:
    root = tmp_path_factory.mktemp("study")
    run_tiny(registry, world, root / "fs1" / "seed1", shots=1, seed=1)
    run_tiny(registry, world, root / "fs1" / "seed2", shots=1, seed=2)
    run_tiny(registry, world, root / "fs2", shots=2, seed=1)
    for folder, data in SYNTHETIC.items():
        (root / folder).mkdir(parents=True)
        (root / folder / "results.json").write_text(json.dumps(data))
    shutil.copytree(root / "b2n" / "dtd", root / "b2n" / "dtd_copy")  # the same pairs twice
    (root / "b2n" / "dtd" / "results.0123abcd.json").write_text("set aside: never read")
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{not json")
    return root


def report(*args: str, registry=None, monkeypatch=None):
    from vlprompt_core.cli import app

    if registry is not None:
        from vlprompt_core import plugins

        monkeypatch.setattr(plugins, "_REGISTRY", registry)
    return CliRunner().invoke(app, ["report", *args])


@pytest.fixture(scope="module")
def reported(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = report(str(study), "-o", str(out))
    assert result.exit_code == 0, result.output
    return out, result


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def accuracies(*folders: Path, label: str) -> list[float]:
    return [r["summary"]["accuracy"] for f in folders
            for r in json.loads((f / "results.json").read_text())["runs"] if r["method"] == label]


def cell(values: list[float]) -> str:
    s = mean_std(values)
    return f"{s['mean']:.2f} ± {s['std']:.2f}" if s["n"] > 1 else f"{s['mean']:.2f}"


def test_seeds_from_separate_folders_are_pooled(study, reported):
    out, _ = reported
    table = section((out / "report.md").read_text(), "1-shot accuracy (tiny_test)")
    rows = read_csv(out / "tables" / "few_shot-tiny_test-1shots.csv")
    for label in ("toy_published", "coop"):
        values = accuracies(study / "fs1" / "seed1", study / "fs1" / "seed2", label=label)
        assert len(values) == 2
        expected = mean_std(values)
        assert row(table, label) == [cell(values), f"{expected['mean']:.2f}"]  # toy, then the average
        assert float(rows[label]["toy mean"]) == pytest.approx(expected["mean"])
        assert float(rows[label]["toy std"]) == pytest.approx(expected["std"])
        assert float(rows[label]["average mean"]) == pytest.approx(expected["mean"])
    one_seed = read_csv(out / "tables" / "few_shot-tiny_test-2shots.csv")
    assert float(one_seed["coop"]["toy mean"]) == pytest.approx(accuracies(study / "fs2", label="coop")[0])
    assert one_seed["coop"]["toy std"] == ""  # one seed: no spread


def test_base2novel_average_is_h_of_the_average_base_and_novel(reported):
    out, _ = reported
    table = section((out / "report.md").read_text(), "base-to-novel, 16-shot (ViT-B-16)")
    dtd = [b2n(80.0, 50.0), b2n(78.0, 54.0)]
    assert row(table, "coop")[:3] == [cell([s[m] for s in dtd]) for m in ("base", "novel", "H")]
    base = (mean_std([80.0, 78.0])["mean"] + 90.0) / 2
    novel = (mean_std([50.0, 54.0])["mean"] + 60.0) / 2
    assert row(table, "coop")[-3:] == [f"{base:.2f}", f"{novel:.2f}", f"{2 * base * novel / (base + novel):.2f}"]
    rows = read_csv(out / "tables" / "base2novel-ViT-B-16-16shots.csv")
    assert float(rows["cocoop"]["eurosat novel mean"]) == 62.0
    assert float(rows["coop"]["average H mean"]) == pytest.approx(2 * base * novel / (base + novel))


def test_cost_sits_beside_accuracy_and_is_blank_without_figures(reported):
    out, _ = reported
    rows = read_csv(out / "tables" / "base2novel-ViT-B-16-16shots-cost.csv")
    assert float(rows["coop"]["time / pair (s) mean"]) == 10.0  # the only coop pair with a cost entry
    assert float(rows["coop"]["trainable parameters mean"]) == 2048
    assert rows["cocoop"]["time / pair (s) mean"] == ""  # results without cost figures
    assert rows["coop"]["average H mean"] != ""
    measured = read_csv(out / "tables" / "few_shot-tiny_test-1shots-cost.csv")
    assert float(measured["coop"]["peak memory (MB) mean"]) > 0
    assert float(measured["coop"]["trainable parameters mean"]) == 2 * 32  # n_ctx 2 x width 32


def test_a_sweep_under_one_label_keeps_its_settings_apart(reported):
    out, _ = reported
    table = section((out / "report.md").read_text(), "4-shot accuracy (ViT-B-16)")
    assert row(table, "coop [sweep/lr0.1]") == ["61.00", "61.00"]
    assert row(table, "coop [sweep/lr0.01]") == ["66.00", "66.00"]


def test_what_was_read_incomplete_copies_and_corrupt_files_are_said(study, reported):
    _, result = reported
    # files: 3 measured + 5 hand-written + the copy (the set-aside and the corrupt one are not read);
    # pairs: 3 x 2 measured + 8 hand-written, the copy's 3 counted once
    assert "read 9 results file(s): 14 finished (method, seed) pair(s), 3 seen twice counted once" in result.stdout
    assert f"incomplete (interrupted): {study / 'b2n' / 'eurosat' / 'results.json'}" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(study / "broken" / "results.json") in warnings[0]
    assert "Traceback" not in result.output


def test_terminal_tables_fit_in_80_columns(reported):
    _, result = reported
    table_lines = [line for line in result.stdout.splitlines() if "│" in line or "━" in line]
    assert table_lines and max(len(line) for line in table_lines) <= 80
    assert "base-to-novel, 16-shot (ViT-B-16) (1/" in result.stdout  # split, not squeezed


def test_latex_is_escaped(reported):
    out, _ = reported
    tex = (out / "tables" / "cross_dataset-imagenet-caltech101-fgvc_aircraft-ViT-B-16.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex
    assert r"fgvc\_aircraft" in tex and r"zs 100\%" in tex
    body = tex.split("\n", 1)[1]
    assert not re.search(r"(?<!\\)[_%]", body), body


def test_figures_have_the_documented_pixel_sizes_and_are_deterministic(study, reported, tmp_path):
    out, _ = reported
    sizes = {"few_shot-tiny_test": (800, 350),  # 1 dataset + Average: 2 panels of 400 x 350
             "few_shot-ViT-B-16": (800, 350),
             "base2novel-ViT-B-16-16shots": (1200, 350),  # dtd, eurosat, average
             "cross_dataset-imagenet-caltech101-fgvc_aircraft-ViT-B-16": (480, 350)}  # 4 columns x 120 px
    assert sorted(p.stem for p in (out / "figures").glob("*.png")) == sorted(sizes)
    for name, size in sizes.items():
        with Image.open(out / "figures" / f"{name}.png") as png:
            assert png.size == size, name
        assert (out / "figures" / f"{name}.svg").stat().st_size > 0
    again = report(str(study), "-o", str(tmp_path), "--format", "svg,png")
    assert again.exit_code == 0, again.output
    for path in (out / "figures").iterdir():
        assert (tmp_path / "figures" / path.name).read_bytes() == path.read_bytes(), path.name


def test_paper_shows_the_published_value_and_the_difference(study, registry, monkeypatch, tmp_path):
    result = report(str(study / "fs1"), "-o", str(tmp_path), "--paper", registry=registry, monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    mean = mean_std(accuracies(study / "fs1" / "seed1", study / "fs1" / "seed2", label="toy_published"))["mean"]
    table = section((tmp_path / "report.md").read_text(), "1-shot accuracy (tiny_test)")
    assert row(table, "toy_published")[0].endswith(f"(paper {PAPER_ACCURACY:.2f}, {mean - PAPER_ACCURACY:+.2f})")
    assert "paper" not in row(table, "coop")[0]  # published numbers of other settings are not shown
    rows = read_csv(tmp_path / "tables" / "few_shot-tiny_test-1shots.csv")
    assert float(rows["toy_published"]["toy published"]) == PAPER_ACCURACY
    assert float(rows["toy_published"]["toy diff"]) == pytest.approx(mean - PAPER_ACCURACY)


def test_a_folder_without_results_is_one_error_line_and_exit_2(tmp_path):
    result = report(str(tmp_path))
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: no finished results under {tmp_path} (looked for results.json files written by 'vlprompt run')"]
    assert "Traceback" not in result.output


def test_an_unknown_figure_format_is_a_user_error(study, tmp_path):
    result = report(str(study), "-o", str(tmp_path), "--format", "png,gif")
    assert result.exit_code == 2 and result.stderr.startswith("error: --format: gif given")


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_shipped_published_numbers_load_and_name_known_datasets(method):
    from vlprompt_core.plugins import get_registry

    entry = get_registry().get("method", method)
    assert entry.published
    for p in entry.published:
        assert p.dataset in DATASETS and p.protocol == "base2novel" and p.shots == 16 and "CVPR 2022" in p.source
        assert set(p.metrics) <= {"base", "novel", "H"} and all(0 < v <= 100 for v in p.metrics.values())
        if len(p.metrics) == 3:  # H as printed is the harmonic mean of base and novel, to rounding
            b, n = p.metrics["base"], p.metrics["novel"]
            assert p.metrics["H"] == pytest.approx(2 * b * n / (b + n), abs=0.006)


def write_results(folder: Path, *runs: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(record({"name": "few_shot", "shots": 16}, "dtd", list(runs))))
    return folder


KGCOOP_A = [pair("kgcoop", s, {"accuracy": acc}, key="lr0.002") for s, acc in ((1, 60.0), (2, 62.0), (3, 64.0))]
KGCOOP_B = [pair("kgcoop", s, {"accuracy": acc}, key="recipe") for s, acc in ((1, 70.0), (2, 72.0), (3, 74.0))]


def kgcoop_rows(out: Path) -> dict[str, dict[str, str]]:
    return {label: r for label, r in read_csv(out / "tables" / "few_shot-ViT-B-16-16shots.csv").items()
            if label.startswith("kgcoop")}


def test_folders_given_with_results_inside_keep_settings_apart(tmp_path):
    a = write_results(tmp_path / "runs" / "kgcoop_30ep", *KGCOOP_A)
    b = write_results(tmp_path / "runs" / "kgcoop_recipe", *KGCOOP_B)
    result = report(str(a), str(b), "-o", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    rows = kgcoop_rows(tmp_path / "report")
    # one row per settings key, named by the folder given (nothing relative to it is left)
    assert {label: float(r["dtd mean"]) for label, r in rows.items()} == {
        "kgcoop [kgcoop_30ep]": 62.0, "kgcoop [kgcoop_recipe]": 72.0}
    parent = report(str(tmp_path / "runs"), "-o", str(tmp_path / "parent"))  # the same study, given by its parent
    assert parent.exit_code == 0, parent.output
    assert {label: float(r["dtd mean"]) for label, r in kgcoop_rows(tmp_path / "parent").items()} == {
        "kgcoop [kgcoop_30ep]": 62.0, "kgcoop [kgcoop_recipe]": 72.0}


def test_rows_of_different_settings_are_never_pooled_whatever_their_names(tmp_path):
    a = write_results(tmp_path / "first" / "out", *KGCOOP_A)  # the same folder name twice
    b = write_results(tmp_path / "second" / "out", *KGCOOP_B,
                      pair("kgcoop [out]", 1, {"accuracy": 10.0}, key="other"))  # a label like a generated row
    result = report(str(a), str(b), "-o", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    rows = kgcoop_rows(tmp_path / "report")
    assert len(rows) == 3, list(rows)
    assert sorted(float(r["dtd mean"]) for r in rows.values()) == [10.0, 62.0, 72.0]
    assert all(r["dtd std"] in ("", repr(mean_std([0.0, 2.0, 4.0])["std"])) for r in rows.values())
    assert not any("[]" in label for label in rows)


def test_two_studies_share_one_zero_shot_row(registry, world, tmp_path):
    for folder, seed, train in (("study_a", 1, {"epochs": 30, "lr": 0.002}), ("study_b", 2, {"epochs": 5, "lr": 0.1})):
        spec = validate_spec({
            "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
            "method": [{"name": "zeroshot"}], "dataset": {"name": "toy", "root": str(world["data"])},
            "protocol": {"name": "few_shot", "shots": 1}, "train": {**train, "batch_size": 4, "seeds": [seed]},
            "output": str(tmp_path / folder),
        }, registry)
        Engine(spec, registry).run()
    result = report(str(tmp_path / "study_a"), str(tmp_path / "study_b"), "-o", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "report" / "tables" / "few_shot-tiny_test-1shots.csv")
    assert list(rows) == ["zeroshot"]  # the training settings of each study do not apply to it
    expected = mean_std(accuracies(tmp_path / "study_a", tmp_path / "study_b", label="zeroshot"))
    assert float(rows["zeroshot"]["toy mean"]) == pytest.approx(expected["mean"]) and expected["n"] == 2
