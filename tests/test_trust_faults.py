"""Faults with a true record and one line (issue 20, points 9 to 12): SIGTERM stops a
run and a parallel sweep as Ctrl-C does; a full disk, a folder that cannot be
written, results and sample files of the wrong shape are one ``error:`` line and a
record that tells the truth; the engine's own I/O and state errors are never blamed
on a plug-in; duplicate YAML keys, ``~`` / ``$VAR`` / empty output folders and
pretrained tags a model has no weights for are said by ``validate``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError
from test_cli import ForkedProcess, start_forked_python
from typer.testing import CliRunner

import vlprompt_core.plugins as plugins
from vlprompt_core import hookimpl
from vlprompt_core.cli import app
from vlprompt_core.engine import Engine
from vlprompt_core.errors import UserError
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.spec import validate_spec

COOP = {"name": "coop", "n_ctx": 2}


def registry(world, *extra):
    os.environ["VLPROMPT_DATASETS_SPEC"] = str(world["specs"])
    return build_registry(*make_plugin_manager(extra=extra))


def spec(world, output, method=None, **train) -> dict:
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method or [{"name": "zeroshot"}, COOP],
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        "train": {"epochs": 1, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32", **train},
        "output": str(output),
    }


def run(reg, data, logs=None) -> dict:
    sink = logs if logs is not None else []
    return Engine(validate_spec(data, reg), reg, log=sink.append).run()


def cli(world, monkeypatch, *args, reg=None):
    """``vlprompt ARGS`` in this process (the toy datasets registered)."""
    monkeypatch.setattr(plugins, "_REGISTRY", reg or registry(world))
    return CliRunner().invoke(app, [str(a) for a in args])


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def one_error(result, code: int) -> str:
    """The single ``error:`` line of a command that exited with ``code`` and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stderr and isinstance(result.exception, (SystemExit, type(None))), \
        result.exception
    (line,) = errors(result)
    return line


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def record(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------ 9: SIGTERM

EPOCH_DONE = "-- epoch done --"
SCRIPT = """
import os, sys
os.environ["VLPROMPT_DATASETS_SPEC"] = {specs!r}
import vlprompt_core.plugins as plugins
from vlprompt_core import hookimpl
from vlprompt_core.cli import main

class Progress:
    @hookimpl
    def vlprompt_epoch_end(self, method, seed, epoch, metrics):
        print({marker!r}, flush=True)

plugins._REGISTRY = plugins.build_registry(*plugins.make_plugin_manager(extra=(("progress", Progress()),)))
sys.argv = ["vlprompt", *{args!r}]
main()
"""


def popen(world, *args: str, cwd=None) -> ForkedProcess:
    """``vlprompt ARGS`` in a process of its own (forked, without starting Python again:
    :func:`test_cli.start_forked_python`) that prints :data:`EPOCH_DONE` after every epoch."""
    code = SCRIPT.format(specs=str(world["specs"]), marker=EPOCH_DONE, args=list(args))
    return start_forked_python(code, dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), cwd=cwd)


def test_sigterm_stops_a_run_as_ctrl_c_does_with_a_true_record(world, tmp_path):
    out = tmp_path / "out"
    spec_file = write(tmp_path / "s.yaml", spec(world, out, [COOP], epochs=500))
    proc = popen(world, "run", str(spec_file))
    assert proc.stdout.readline().strip() == EPOCH_DONE  # one epoch done: the run is under way
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert any(line.startswith("interrupted (SIGTERM):") and str(out) in line for line in stderr.splitlines()), stderr
    stopped = record(out)
    assert stopped["status"] == "interrupted" and stopped["error"] == "stopped by SIGTERM"
    assert list((out / "checkpoints").glob("*.state.safetensors"))  # the same command continues from it


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow  # a sweep of two runs in two worker processes
@pytest.mark.skipif(not any(Path("/proc/self/task").glob("*/children")), reason="reads worker processes from /proc")
def test_sigterm_stops_a_parallel_sweep_its_workers_and_their_runs(world, tmp_path):
    base = spec(world, tmp_path / "unused", [COOP], epochs=500)
    del base["output"]
    sweep_file = write(tmp_path / "sweep.yaml", {"spec": base, "grid": {"train.lr": [0.002, 0.003]},
                                                 "output": str(tmp_path / "out")})
    proc = popen(world, "sweep", str(sweep_file), "--jobs", "2", "--no-report")
    folders = [tmp_path / "out" / "lr-0.002", tmp_path / "out" / "lr-0.003"]
    for _ in range(100_000):  # until both runs are training (a hang guard, not a clock)
        if proc.poll() is not None:
            pytest.fail(proc.communicate()[1])
        states = [list((f / "checkpoints").glob("*.state.safetensors")) if f.is_dir() else [] for f in folders]
        if all(states):
            break
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "interrupted (SIGTERM):" in stderr, stderr
    for _ in range(100_000):  # the workers stop with the sweep
        if not any(_alive(pid) for pid in workers):
            break
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)]
    index = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [(r["outcome"]["status"], r["outcome"]["error"]) for r in index["runs"]] == \
        [("interrupted", "stopped by SIGTERM")] * 2
    for folder in folders:
        assert (record(folder)["status"], record(folder)["error"]) == ("interrupted", "stopped by SIGTERM")


def test_an_interruption_in_process_is_recorded_with_what_stopped_it(world, tmp_path):
    """The engine's record names the signal (an in-process check of what the CLI relies on)."""
    from vlprompt_core.engine import Terminated

    class Stop:
        @hookimpl
        def vlprompt_epoch_end(self, method, seed, epoch, metrics):
            raise Terminated(signal.SIGTERM)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(registry(world, ("stop", Stop())), spec(world, out, [COOP], epochs=2))
    assert (record(out)["status"], record(out)["error"]) == ("interrupted", "stopped by SIGTERM")


def _sweep_file(world, tmp_path) -> Path:
    base = spec(world, tmp_path / "unused", [COOP], epochs=2)
    del base["output"]
    return write(tmp_path / "sweep.yaml", {"spec": base, "grid": {"train.lr": [0.002, 0.003]},
                                           "output": str(tmp_path / "out")})


def test_sigterm_in_a_sweep_run_in_process_marks_it_and_the_rest_not_started(world, tmp_path, monkeypatch):
    from vlprompt_core.engine import Terminated

    class Stop:
        @hookimpl
        def vlprompt_epoch_end(self, method, seed, epoch, metrics):
            raise Terminated(signal.SIGTERM)  # as the handler raises it where the run is

    result = cli(world, monkeypatch, "sweep", _sweep_file(world, tmp_path), "--no-report",
                 reg=registry(world, ("stop", Stop())))
    assert result.exit_code == 143, result.stderr
    assert "interrupted (SIGTERM):" in result.stderr and "Traceback" not in result.stderr
    index = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [(r["outcome"]["status"], r["outcome"]["error"]) for r in index["runs"]] == \
        [("interrupted", "stopped by SIGTERM"), ("interrupted", "not started (stopped by SIGTERM)")]
    assert record(tmp_path / "out" / "lr-0.002")["status"] == "interrupted"


def test_a_full_disk_under_a_sweeps_folder_is_one_line(world, tmp_path, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("vlprompt_core.sweep.atomic_write_json", full)
    line = one_error(cli(world, monkeypatch, "sweep", _sweep_file(world, tmp_path), "--no-report"), 1)
    assert str(tmp_path / "out" / "sweep.json") in line and "No space left on device" in line


# ------------------------------------------------------------------ 10: full disk, unwritable folders, bad files

NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"


def full_disk(monkeypatch, where: Path | None = None) -> None:
    """safetensors files written under ``where`` (anywhere: None) fail as on a full disk."""
    import safetensors.torch

    serialize = safetensors.torch.serialize_file

    def full(tensors, filename, metadata=None):
        if where is None or where in Path(filename).parents:
            raise SafetensorError(NO_SPACE)  # what safetensors raises when the disk is full
        return serialize(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)


def test_a_full_disk_under_the_results_folder_is_one_line_and_a_failed_record(world, tmp_path, monkeypatch):
    full_disk(monkeypatch)
    out = tmp_path / "out"
    result = cli(world, monkeypatch, "run", write(tmp_path / "s.yaml", spec(world, out)))
    line = one_error(result, 1)
    assert "No space left on device" in line and str(out / "checkpoints") in line
    assert "free space" in line and "plug-in" not in line
    assert record(out)["status"] == "failed" and "No space left on device" in record(out)["error"]
    assert record(out)["failures"] == []  # no pair is blamed


def test_a_full_disk_that_refuses_results_json_too_says_the_record_could_not_be_updated(world, tmp_path, monkeypatch):
    import vlprompt_core.results as results

    out = tmp_path / "out"
    write_json = results.atomic_write_json

    def first_only(path, data):  # the run's first record is written, then the disk is full
        if path.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_json(path, data)

    full_disk(monkeypatch)
    monkeypatch.setattr("vlprompt_core.engine.record.atomic_write_json", first_only)
    result = cli(world, monkeypatch, "run", write(tmp_path / "s.yaml", spec(world, out, [COOP])))
    line = one_error(result, 1)
    assert "No space left on device" in line
    assert f"{out / 'results.json'} could not be updated" in line
    assert record(out)["status"] == "running"  # what the line says


def test_a_full_feature_cache_disk_is_one_line_naming_the_setting_not_the_plugins(world, tmp_path, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    full_disk(monkeypatch, cache)  # the cache's disk is full, the results' is not
    result = cli(world, monkeypatch, "run", write(tmp_path / "s.yaml", spec(world, out, feature_cache=str(cache))))
    line = one_error(result, 1)
    assert str(cache) in line and "No space left on device" in line and "train.feature_cache" in line
    assert "plug-in" not in line
    assert record(out)["status"] == "failed" and record(out)["failures"] == []


@pytest.fixture()
def read_only(monkeypatch):
    """Folders made read-only as a non-root user would see them (the tests run as root,
    whom permissions do not stop): ``os.access`` says so, and writing there fails."""
    import builtins

    folders: list[Path] = []
    access, mkdir, opener = os.access, Path.mkdir, builtins.open

    def inside(path) -> bool:
        p = Path(os.path.abspath(path))
        return any(p == f or f in p.parents for f in folders)

    def fake_access(path, mode, **kwargs):
        return False if (mode & os.W_OK) and inside(path) else access(path, mode, **kwargs)

    def fake_mkdir(self, *args, **kwargs):
        if inside(self) and not self.is_dir():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return mkdir(self, *args, **kwargs)

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and any(m in mode for m in "wax+") and inside(file):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return opener(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", fake_access)
    monkeypatch.setattr(Path, "mkdir", fake_mkdir)
    monkeypatch.setattr(builtins, "open", fake_open)
    return folders


def test_a_read_only_output_folder_is_said_by_validate_and_run(world, tmp_path, monkeypatch, read_only):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only.append(locked)
    spec_file = write(tmp_path / "s.yaml", spec(world, locked / "out"))
    for command in ("validate", "run"):
        line = one_error(cli(world, monkeypatch, command, spec_file), 2)
        assert f"output: {locked} is not writable" in line, line
    assert not (locked / "out").exists()


def test_report_into_a_folder_that_cannot_be_written_is_one_line(world, tmp_path, monkeypatch, read_only):
    out = tmp_path / "out"
    run(registry(world), spec(world, out, [{"name": "zeroshot"}]))
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only.append(locked)
    line = one_error(cli(world, monkeypatch, "report", out, "--output", locked / "report"), 2)
    assert str(locked) in line and "--output" in line
    (tmp_path / "a-file").write_text("x")  # a file where the report's folder must be: refused for root too
    line = one_error(cli(world, monkeypatch, "report", out, "--output", tmp_path / "a-file" / "report"), 2)
    assert str(tmp_path / "a-file") in line and "--output" in line


WRONG_SHAPES = [{"runs": 5}, [1, 2], "text", {"runs": [1]}, {"runs": [{"key": [1], "seed": 1}]},
                {"runs": [{"key": "k", "seed": "one"}]}, {"spec_hash": 5, "runs": None}]


@pytest.mark.parametrize("content", WRONG_SHAPES, ids=[json.dumps(c) for c in WRONG_SHAPES])
def test_results_json_of_the_wrong_shape_is_set_aside_by_run(world, tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(content))
    logs: list[str] = []
    done = run(registry(world), spec(world, out, [{"name": "zeroshot"}]), logs)
    assert done["status"] == "complete"
    (aside,) = out.glob("results.*.json")
    assert json.loads(aside.read_text()) == content  # kept, never overwritten
    assert any("not a vlprompt results file" in line and aside.name in line for line in logs), logs


@pytest.mark.parametrize("content", WRONG_SHAPES, ids=[json.dumps(c) for c in WRONG_SHAPES])
def test_results_json_of_the_wrong_shape_is_one_line_for_eval_and_report(world, tmp_path, monkeypatch, content):
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps(content))
    spec_file = write(tmp_path / "s.yaml", spec(world, tmp_path / "out", [COOP]))
    one_error(cli(world, monkeypatch, "eval", spec_file, "--from", old), 2)
    result = cli(world, monkeypatch, "report", old, "--output", tmp_path / "report")
    line = one_error(result, 2)  # its only results file is not one: nothing to report
    assert "no finished results" in line
    assert f"warning: {old / 'results.json'}: not a vlprompt results file" in result.stderr


WRONG_TYPES = {
    "key a list": lambda r: r["runs"][0].update(key=[1]),
    "method a list": lambda r: r["runs"][0].update(method=["x"]),
    "dataset name a list": lambda r: r["spec"]["dataset"].update(name=[1]),
    "shots a list": lambda r: r["spec"]["protocol"].update(shots=[2]),
    "no metrics": lambda r: r["runs"][0].update(summary={}),
    "other metrics": lambda r: r["runs"][0].update(summary={"acc": 5}),
}


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    run(registry(world), spec(world, out, [{"name": "zeroshot"}], seeds=[1, 2]))
    return out


@pytest.mark.parametrize("change", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_report_skips_a_results_file_of_the_wrong_types_with_one_warning(world, tmp_path, monkeypatch, finished,
                                                                         change):
    bad = tmp_path / "study" / "bad"
    bad.mkdir(parents=True)
    content = record(finished)
    change(content)
    (bad / "results.json").write_text(json.dumps(content))
    shutil.copytree(finished, tmp_path / "study" / "good")
    result = cli(world, monkeypatch, "report", tmp_path / "study", "--output", tmp_path / "report")
    assert result.exit_code == 0 and result.exception is None, (result.stderr, result.exception)
    assert f"warning: {bad / 'results.json'}: not a vlprompt results file, skipped" in result.stderr
    assert "read 2 results file(s)" not in result.stdout and "read 1 results file(s): 2 finished" in result.stdout
    line = one_error(cli(world, monkeypatch, "report", bad, "--output", tmp_path / "report2"), 2)
    assert "no finished results" in line


def test_a_truncated_few_shot_sample_is_set_aside_and_written_again(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    spec_file = write(tmp_path / "s.yaml", spec(world, out, [{"name": "zeroshot"}]))
    assert cli(world, monkeypatch, "run", spec_file).exit_code == 0
    sample = out / "fewshot" / "seed1.json"
    whole = sample.read_text()
    sample.write_text(whole[: len(whole) // 2])
    result = cli(world, monkeypatch, "run", spec_file)
    assert result.exit_code == 0 and "Traceback" not in result.stderr, result.stderr
    assert sample.read_text() == whole
    (aside,) = (out / "fewshot").glob("seed1.*.json")
    assert aside.read_text() == whole[: len(whole) // 2]
    assert f"{sample}: not readable" in result.stderr


# ------------------------------------------------------------------ 11: the engine's own faults are not the plug-ins'


def test_an_output_folder_replaced_mid_run_is_the_engines_fault_not_the_methods(world, tmp_path, monkeypatch):
    out = tmp_path / "out"

    class Vandal:
        @hookimpl
        def vlprompt_epoch_end(self, method, seed, epoch, metrics):
            shutil.rmtree(out)
            out.write_text("not a folder")  # the results folder is gone: a file in its place

    result = cli(world, monkeypatch, "run", write(tmp_path / "s.yaml", spec(world, out, [COOP])),
                 reg=registry(world, ("vandal", Vandal())))
    line = one_error(result, 1)
    assert "plug-in" not in line and str(out) in line
    assert "could not be updated" in line  # its results.json cannot be written any more


def test_a_feature_cache_entry_that_is_a_folder_is_one_line_naming_it(world, tmp_path, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    data = spec(world, out, feature_cache=str(cache))
    run(registry(world), data)
    (entry,) = cache.glob("*.safetensors")
    entry.unlink()
    entry.mkdir()
    shutil.rmtree(out)
    result = cli(world, monkeypatch, "run", write(tmp_path / "s.yaml", data))
    line = one_error(result, 1)
    assert str(entry) in line and "plug-in" not in line and "train.feature_cache" in line
    assert record(out)["status"] == "failed" and record(out)["failures"] == []


def _stopped_state(world, out) -> Path:
    """The training state of a coop pair stopped after its first epoch (of 2)."""
    class Stop:
        @hookimpl
        def vlprompt_epoch_end(self, method, seed, epoch, metrics):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(registry(world, ("stop", Stop())), spec(world, out, [COOP], epochs=2))
    (state,) = (out / "checkpoints").glob("*.state.safetensors")
    return state


def _rewrite_metadata(path: Path, **changes: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(path)), str(path), metadata={**meta, **changes})


MALFORMED = {
    "position is a list": {"position": "[1]"},
    "position epoch is text": {"position": json.dumps({"epoch": "one"})},
    "position sums wrong": {"position": json.dumps({"epoch": 1, "step": 0, "sums": 3})},
    "optimizer groups wrong": {"optimizer": json.dumps({"param_groups": [], "plain": {}})},
    "rng wrong": {"rng": json.dumps({"python": [1], "numpy": []})},
    "log not a list": {"log": "5"},
    "past the end": {"position": json.dumps({"epoch": 7, "step": 0, "sums": [0.0, 0, 0, {}]})},
    "step past the end": {"position": json.dumps({"epoch": 1, "step": 10_000, "sums": [0.0, 0, 0, {}]})},
    "negative epoch": {"position": json.dumps({"epoch": -1, "step": 0, "sums": [0.0, 0, 0, {}]})},
}


@pytest.mark.parametrize("change", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_training_state_is_refused_naming_the_file_not_blaming_the_method(world, tmp_path, monkeypatch,
                                                                                     change):
    out = tmp_path / "out"
    state = _stopped_state(world, out)
    _rewrite_metadata(state, **change)
    result = cli(world, monkeypatch, "run", write(tmp_path / "s.yaml", spec(world, out, [COOP], epochs=2)))
    line = one_error(result, 2)
    assert str(state) in line and "delete it" in line and "plug-in" not in line, line
    assert record(out)["status"] == "failed" and record(out)["failures"] == []


def test_a_state_at_the_end_of_training_is_still_finished(world, tmp_path):
    """Saved after the last epoch, before the pair was recorded: scored, not trained again."""
    out = tmp_path / "out"
    state = _stopped_state(world, out)
    from safetensors import safe_open

    with safe_open(str(state), "pt") as f:
        (epoch,) = json.loads(f.metadata()["log"])
    _rewrite_metadata(state, position=json.dumps({"epoch": 2, "step": 0, "sums": [0.0, 0, 0, {}]}),
                      log=json.dumps([epoch, {**epoch, "epoch": 1}]))
    logs: list[str] = []
    done = run(registry(world), spec(world, out, [COOP], epochs=2), logs)
    assert done["status"] == "complete" and any("resuming after epoch 2 of 2" in line for line in logs)


def test_a_plugins_own_exception_is_still_the_plugins(world, tmp_path):
    from toy_methods import Plugin as Toys

    class Broken(Toys):
        @hookimpl
        def vlprompt_methods(self):
            from vlprompt_core.api import MethodEntry, Options

            def build(backbone, classes, options):
                raise OSError(errno.ENOENT, "its own file is missing", "/nowhere/its-file")

            return [MethodEntry("toy_io", Options, build, "raises OSError in its own code")]

    done = run(registry(world, ("broken", Broken())), spec(world, tmp_path / "out", [{"name": "toy_io"},
                                                                                      {"name": "zeroshot"}]))
    (failure,) = done["failures"]
    assert "method 'toy_io' from plug-in broken" in failure["error"] and "its own file is missing" in failure["error"]
    assert [r["method"] for r in done["runs"]] == ["zeroshot"]


# ------------------------------------------------------------------ 12: specs said by validate


def _validate(world, monkeypatch, tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return cli(world, monkeypatch, "validate", path)


def _spec_text(world, tmp_path, **extra) -> str:
    data = spec(world, tmp_path / "out", [COOP])
    data.update(extra)
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("where", ["top level", "nested", "in a list item"])
def test_a_duplicate_key_in_a_spec_is_one_line_from_validate(world, tmp_path, monkeypatch, where):
    text = _spec_text(world, tmp_path)
    if where == "top level":
        text += "train:\n  epochs: 9\n"
        key = "train"
    elif where == "nested":
        text = text.replace("  epochs: 1\n", "  epochs: 1\n  epochs: 9\n")
        key = "epochs"
    else:
        text = text.replace("  n_ctx: 2\n", "  n_ctx: 2\n  n_ctx: 4\n")
        key = "n_ctx"
    line = one_error(_validate(world, monkeypatch, tmp_path, text), 2)
    second = next(i for i, ln in enumerate(text.splitlines(), 1)
                  if ln.strip().startswith(f"{key}:") and i > text.splitlines().index(
                      next(x for x in text.splitlines() if x.strip().startswith(f"{key}:"))) + 1)
    assert f"line {second}:" in line and f"'{key}' appears twice" in line, line


def test_duplicate_keys_are_refused_in_sweep_files_and_dataset_spec_files(world, tmp_path, monkeypatch):
    base = spec(world, tmp_path / "out", [COOP])
    del base["output"]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"spec": base, "grid": {"train.lr": [0.1]}}) + "grid:\n  train.lr: [0.2]\n")
    line = one_error(cli(world, monkeypatch, "sweep", sweep, "--dry-run"), 2)
    assert str(sweep) in line and "'grid' appears twice" in line

    from vlprompt_core.builtin.custom_datasets import read_data_info
    from vlprompt_core.builtin.spec_datasets import read_spec_files

    specs = tmp_path / "specs"
    specs.mkdir()
    text = (world["specs"] / "toy.yaml").read_text()
    (specs / "toy.yaml").write_text(text + "classnames: [a, b]\n")
    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", str(specs))
    entries, problems = read_spec_files()
    assert "toy" not in [e.name for e in entries]
    assert [p for p in problems if str(specs / "toy.yaml") in p and "'classnames' appears twice" in p], problems
    info = tmp_path / "info.yaml"
    info.write_text("classnames: [a, b]\nclassnames: [c, d]\n")
    with pytest.raises(UserError, match="line 2: .*'classnames' appears twice"):
        read_data_info(info)


def test_output_with_a_tilde_is_the_home_folder(world, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    reg = registry(world)
    data = spec(world, "~/runs/x", [{"name": "zeroshot"}])
    assert validate_spec(data, reg).output == tmp_path / "home" / "runs" / "x"


@pytest.mark.parametrize("output, says", [
    ("$HOME/x", "output: '$HOME/x' holds $HOME"),
    ("${SCRATCH}/runs", "output: '${SCRATCH}/runs' holds ${SCRATCH}"),
    ("", "output: empty"),
    ("  ", "output: empty"),
])
def test_output_with_a_variable_or_empty_is_one_line_from_validate(world, tmp_path, monkeypatch, output, says):
    line = one_error(_validate(world, monkeypatch, tmp_path, _spec_text(world, tmp_path, output=output)), 2)
    assert says in line, line


def test_a_pretrained_tag_on_a_model_without_tags_is_one_line_from_validate(world, tmp_path, monkeypatch):
    for model in ("vlprompt_tiny", str(world["config"])):
        text = _spec_text(world, tmp_path, backbone={"name": "open_clip", "model": model, "pretrained": "openai"})
        line = one_error(_validate(world, monkeypatch, tmp_path, text), 2)
        assert "backbone.pretrained: no tag 'openai'" in line, line
