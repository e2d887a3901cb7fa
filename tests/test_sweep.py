"""Sweeps: a grid over a base spec, run by the local executor and by Ray with the
same results; resumed, checked before running, one failing run not stopping the rest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file
from test_cli import finish, start_vlprompt_process, vlprompt

from vlprompt_core.errors import UserError
from vlprompt_core.sweep import SweepSpec, expand, set_path

MODEL = "tiny_test"  # the stem of the world's model config file: the report names the model by it


def base(world) -> dict:
    """The run spec every run of the sweeps here starts from: the tiny model of the test
    world (``tests/conftest.py``) on its 6-class ``toy`` dataset, random crops included
    (the executors must draw the same augmentations)."""
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "coop"},
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 1},
        "train": {"epochs": 2, "batch_size": 4, "seeds": [1], "crop_scale": [0.8, 1.0]},
    }


GRID = {"method": [{"name": "coop", "n_ctx": 4}, {"name": "cocoop", "n_ctx": 4}], "protocol.shots": [1, 2]}
FOLDERS = ["method-coop_shots-1", "method-coop_shots-2", "method-cocoop_shots-1", "method-cocoop_shots-2"]


def write_sweep(world, folder: Path, output: Path, grid=GRID, **extra) -> Path:
    (folder / "base.yaml").write_text(yaml.safe_dump(base(world)))
    sweep = {"base": "base.yaml", "grid": grid, "output": str(output), "resources": {"cpus": 1}, **extra}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def env(world):
    """What ``vlprompt`` needs to see the test world's datasets (in this process, its
    worker processes, a subprocess and its Ray workers alike)."""
    return {"VLPROMPT_DATASETS_SPEC": str(world["specs"])}


@pytest.fixture(scope="module")
def local_and_ray(tmp_path_factory, world, env):
    """The same 4-run sweep (2 methods x 2 shot counts, 1 seed) run locally, in two
    local worker processes (``--jobs 2``) and on a local 2-CPU Ray instance, each from a
    sweep file of its own into an output folder of its own (``tmp / "local"``, ...)."""
    tmp = tmp_path_factory.mktemp("sweep")
    for name in ("local", "jobs", "ray"):
        (tmp / f"{name}-spec").mkdir()
    # Ray in a `vlprompt` process of its own (as users start it), while the others run in this one
    ray = start_vlprompt_process("sweep", str(write_sweep(world, tmp / "ray-spec", tmp / "ray")), "--executor", "ray",
                                 "--ray-cpus", "2", "--no-report", env_extra=env)
    try:
        local = vlprompt("sweep", str(write_sweep(world, tmp / "local-spec", tmp / "local")), env_extra=env)  # + report
        jobs = vlprompt("sweep", str(write_sweep(world, tmp / "jobs-spec", tmp / "jobs")), "--jobs", "2",
                        "--no-report", env_extra=env)
    finally:
        ray = finish(ray)
    assert jobs.returncode == 0, jobs.stderr
    return tmp, local, ray


@pytest.mark.slow  # three sweeps of 4 runs each: local, in 2 processes, on a local Ray instance
@pytest.mark.parametrize("other", ["ray", "jobs"])
def test_local_and_ray_executors_give_identical_results(local_and_ray, other):
    """In this process, on Ray, and in two local processes at once (``--jobs 2``)."""
    tmp, local, ray = local_and_ray
    assert local.returncode == 0, local.stderr
    assert ray.returncode == 0, ray.stderr
    for folder in FOLDERS:
        a = json.loads((tmp / "local" / folder / "results.json").read_text())
        b = json.loads((tmp / other / folder / "results.json").read_text())
        assert a["status"] == b["status"] == "complete"
        (ra,), (rb,) = a["runs"], b["runs"]
        assert ra["accuracy"] == rb["accuracy"]
        assert [e["loss"] for e in ra["epochs"]] == [e["loss"] for e in rb["epochs"]]
        ta = load_file(tmp / "local" / folder / ra["checkpoint"])
        tb = load_file(tmp / other / folder / rb["checkpoint"])
        assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)  # bit-identical prompts
    ran = json.loads((tmp / "ray" / "sweep.json").read_text())
    assert [r["folder"] for r in ran["runs"]] == FOLDERS
    assert all(r["outcome"]["status"] == "complete" for r in ran["runs"])
    for folder in FOLDERS:  # progress: one line per finished run
        assert f"done {folder} (" in local.stderr and f"done {folder} (" in ray.stderr


@pytest.mark.slow  # three sweeps of 4 runs each: local, in 2 processes, on a local Ray instance
def test_the_sweep_report_holds_the_numbers_of_its_results_files(local_and_ray):
    tmp, local, _ = local_and_ray
    report = tmp / "local" / "report"
    for shots in (1, 2):
        with open(report / "tables" / f"few_shot-{MODEL}-{shots}shots.csv") as f:
            rows = {row["method"]: row for row in csv.DictReader(f)}
        assert set(rows) == {"coop", "cocoop"}
        for name in ("coop", "cocoop"):
            record = json.loads((tmp / "local" / f"method-{name}_shots-{shots}" / "results.json").read_text())
            (run,) = record["runs"]
            assert float(rows[name]["toy mean"]) == pytest.approx(run["summary"]["accuracy"])
            assert float(rows[name]["average mean"]) == pytest.approx(run["summary"]["accuracy"])  # one dataset
            assert rows[name]["toy std"] == ""  # one seed
            assert f"{run['summary']['accuracy']:.2f}" in local.stdout  # printed too
    # accuracy against shots: one panel for the dataset, one for the average, 400 x 350 px each
    with Image.open(report / "figures" / f"few_shot-{MODEL}.png") as png:
        assert png.format == "PNG" and png.size == (800, 350)
    assert (report / "figures" / f"few_shot-{MODEL}.svg").is_file()
    assert (report / "report.md").is_file()


@pytest.mark.slow  # three sweeps of 4 runs each: local, in 2 processes, on a local Ray instance
def test_the_grid_values_reach_each_run(local_and_ray):
    tmp, _, _ = local_and_ray
    for folder in FOLDERS:
        spec = json.loads((tmp / "local" / folder / "results.json").read_text())["spec"]
        name, shots = folder.removeprefix("method-").split("_shots-")
        assert [m["name"] for m in spec["method"]] == [name] and spec["method"][0]["n_ctx"] == 4
        assert spec["protocol"]["shots"] == int(shots)
        assert spec["train"]["batch_size"] == 4  # the rest comes from the base spec


@pytest.mark.slow  # three sweeps of 4 runs each: local, in 2 processes, on a local Ray instance
def test_a_finished_sweep_run_again_skips_every_run(local_and_ray, env):
    tmp, _, _ = local_and_ray
    before = {f: (tmp / "local" / f / "results.json").stat().st_mtime_ns for f in FOLDERS}
    again = vlprompt("sweep", str(tmp / "local-spec" / "sweep.yaml"), "--no-report", env_extra=env)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("skipped ") == 4 and "4 skipped" in again.stdout
    assert before == {f: (tmp / "local" / f / "results.json").stat().st_mtime_ns for f in FOLDERS}


def test_dry_run_lists_the_runs_and_runs_nothing(world, tmp_path, env):
    proc = vlprompt("sweep", str(write_sweep(world, tmp_path, tmp_path / "out")), "--dry-run", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert all(f in proc.stdout for f in FOLDERS) and proc.stdout.count("to run") == 4
    assert not (tmp_path / "out").exists()


def test_a_failing_run_is_reported_and_the_others_finish(world, tmp_path, env):
    grid = {"method.n_ctx": [2], "train.lr": [0.002, 1e30]}  # the second diverges: its context explodes
    proc = vlprompt("sweep", str(write_sweep(world, tmp_path, tmp_path / "out", grid=grid)), "--no-report",
                    env_extra=env)
    assert proc.returncode == 1
    index = json.loads((tmp_path / "out" / "sweep.json").read_text())
    status = {r["folder"]: r["outcome"]["status"] for r in index["runs"]}
    assert status == {"n_ctx-2_lr-0.002": "complete", "n_ctx-2_lr-1e-30": "failed"} or \
        status == {"n_ctx-2_lr-0.002": "complete", "n_ctx-2_lr-1e+30": "failed"}
    failed = next(r for r in index["runs"] if r["outcome"]["status"] == "failed")
    assert "exploded" in failed["outcome"]["error"] and "try a lower train.lr" in failed["outcome"]["error"]
    assert "failed n_ctx-2_lr-1e" in proc.stderr


@pytest.mark.parametrize("grid, message", [
    ({"protocol.shots": [1, "many"]}, "run shots-many: protocol.shots: Input should be a valid integer"),
    ({"method.0.n_ctx": [2]}, "grid.method.0.n_ctx: method is a single section in the base spec"),
    ({"bogus": [1]}, "run bogus-1: bogus: unknown key"),
    ({"protocol.shots": []}, "grid.protocol.shots: needs at least one value"),
])
def test_mistakes_in_a_sweep_are_one_line_each_before_anything_runs(world, tmp_path, env, grid, message):
    proc = vlprompt("sweep", str(write_sweep(world, tmp_path, tmp_path / "out", grid=grid)), env_extra=env)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_set_path_walks_mappings_and_lists_and_makes_missing_sections():
    data = {"method": [{"name": "coop"}, {"name": "cocoop"}], "train": {"lr": 1}}
    set_path(data, "method.1.n_ctx", 8)
    set_path(data, "train.lr", 0.5)
    set_path(data, "protocol.shots", 4)
    assert data == {"method": [{"name": "coop"}, {"name": "cocoop", "n_ctx": 8}], "train": {"lr": 0.5},
                    "protocol": {"shots": 4}}
    with pytest.raises(UserError, match="a list of 2; '2' is not an index"):
        set_path(data, "method.2.n_ctx", 1)


def test_folder_names_follow_a_template_and_stay_apart(world, registry, tmp_path):
    sweep = SweepSpec(spec=base(world), grid={"protocol.shots": [1, 2], "train.seeds": [[1], [1]]},
                      name="{protocol.shots}shot", output=tmp_path)
    assert [r.folder for r in expand(sweep, registry)] == ["1shot", "1shot_2", "2shot", "2shot_2"]
    sweep.name = "{protocol.epochs}"
    with pytest.raises(UserError, match="not an axis of the grid"):
        expand(sweep, registry)
    sweep.name = "../{protocol.shots}"
    with pytest.raises(UserError, match="not a folder inside the sweep's output folder"):
        expand(sweep, registry)
    sweep.name = "{train.seeds}/{protocol.shots}shot"  # a folder per value of the first axis
    assert [r.folder for r in expand(sweep, registry)] == ["1/1shot", "1/1shot_2", "1/2shot", "1/2shot_2"]


def test_the_shipped_sweep_expands_into_its_30_checked_runs(tmp_path, monkeypatch):
    from vlprompt_core.plugins import get_registry
    from vlprompt_core.sweep import load_sweep

    monkeypatch.setenv("VLPROMPT_DATA", str(tmp_path))
    sweep = load_sweep(Path(__file__).resolve().parents[1] / "examples" / "fewshot_sweep.yaml")
    runs = expand(sweep, get_registry(refresh=True))
    assert len(runs) == 30 and len({r.folder for r in runs}) == 30
    assert runs[0].folder == "embedded_objects/zeroshot-1shot"
    assert runs[-1].folder == "embedded_objects_closeup/cocoop-16shot"
    assert all(r.output == Path("runs/fewshot_sweep") / r.folder for r in runs)
