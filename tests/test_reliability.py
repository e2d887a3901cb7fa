"""Runs that stop and start again: exact resume after an interruption or a kill -9,
one run per results folder, a true record when something fails, non-finite losses,
plug-ins that raise."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_cli import ForkedProcess, start_forked_python, vlprompt
from toy_methods import Plugin as Toys
from vlprompt_core import hookimpl
from vlprompt_core.api import BackboneEntry, MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.engine import Engine, PluginError
from vlprompt_core.errors import UserError
from vlprompt_core.lock import LOCK_NAME, FolderLock
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.prompting import class_text_features
from vlprompt_core.spec import validate_spec
from vlprompt_kernels import cosine_logits

# ------------------------------------------------------------------ toy faults


class FaultOptions(Options):
    fail_in_epoch: int = 1


class NanLoss(PromptMethod):
    """Trains a scale; from epoch ``fail_in_epoch`` (0-based) on its loss is NaN."""

    def __init__(self, backbone, classes, options):
        super().__init__(backbone, classes, options)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.epoch = 0
        self.set_classes(classes)

    def set_classes(self, classes):
        self.text = class_text_features(self.backbone, classes.names, classes.templates[:1])

    def forward(self, batch):
        logits = self.scale * cosine_logits(batch.image_features.float(), self.text, 10.0)
        if self.training and self.epoch >= self.options.fail_in_epoch:
            logits = logits * float("nan")
        return MethodOutput(logits)

    def on_epoch_end(self, epoch, epochs):
        self.epoch = epoch + 1


class Crashing(NanLoss):
    def forward(self, batch):
        if self.training and self.epoch >= self.options.fail_in_epoch:
            raise RuntimeError("the toy crashed")
        return super().forward(batch)


class Faults:
    """Toy faulty plug-ins: two methods and a backbone that cannot load."""

    @hookimpl
    def vlprompt_methods(self):
        return [MethodEntry("toy_nan", FaultOptions, NanLoss, "NaN loss"),
                MethodEntry("toy_crash", FaultOptions, Crashing, "raises")]

    @hookimpl
    def vlprompt_backbones(self):
        def build(opts):
            raise RuntimeError("weights are corrupt")

        class Opts(Options):
            pass

        return [BackboneEntry("broken", Opts, build, "cannot load")]


class FailingLogger:
    def __init__(self):
        self.calls = 0

    @hookimpl
    def vlprompt_epoch_end(self, method, seed, epoch, metrics):
        self.calls += 1
        raise ValueError("the logging server is down")


class Interrupt:
    """Ctrl-C at the end of one epoch of one pair (as a logger hook sees it)."""

    def __init__(self, method, epoch):
        self.at = (method, epoch)

    @hookimpl
    def vlprompt_epoch_end(self, method, seed, epoch, metrics):
        if (method, epoch) == self.at:
            raise KeyboardInterrupt


def registry(world, *extra):
    os.environ["VLPROMPT_DATASETS_SPEC"] = str(world["specs"])
    plugins = (("toys", Toys()), ("faults", Faults()), *extra)
    return build_registry(*make_plugin_manager(extra=plugins))


def spec(world, output, method, backbone=None, **train):
    return {
        "backbone": backbone or {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method,
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        "train": {"epochs": 4, "batch_size": 4, "seeds": [1, 2], "device": "cpu", "precision": "fp32", **train},
        "output": str(output),
    }


def run(reg, data, logs=None):
    sink = logs if logs is not None else []
    return Engine(validate_spec(data, reg), reg, log=lambda line: line.startswith("kernels:") or sink.append(line)).run()


def outcome(record: dict) -> dict:
    """What must not depend on interruptions: accuracies and the per-epoch log but its times."""
    return {(r["method"], r["seed"]): (r["accuracy"], [{k: v for k, v in e.items() if k != "time_s"}
                                                       for e in r["epochs"]]) for r in record["runs"]}


def checkpoints(folder: Path) -> dict:
    return {p.name: load_file(str(p)) for p in sorted((folder / "checkpoints").glob("*.safetensors"))}


METHODS = [{"name": "coop", "n_ctx": 2}, {"name": "toy_visual"}, {"name": "provp", "n_prompts": 2}]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    record = run(registry(world), spec(world, out, METHODS))
    return record, out


# ------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("method,epoch", [("coop", 0), ("toy_visual", 2), ("provp", 1)])
def test_interrupted_run_resumes_exactly(world, tmp_path, uninterrupted, method, epoch):
    ref, ref_out = uninterrupted
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(registry(world, ("stop", Interrupt(method, epoch))), spec(world, out, METHODS))
    stopped = json.loads((out / "results.json").read_text())
    assert stopped["status"] == "interrupted"
    states = list((out / "checkpoints").glob("*.state.safetensors"))
    assert len(states) == 1  # the pair in flight; finished pairs keep no state
    logs: list[str] = []
    record = run(registry(world), spec(world, out, METHODS), logs)
    assert any(f"resuming after epoch {epoch + 1} of 4" in line for line in logs)
    assert record["status"] == "complete"
    assert outcome(record) == outcome(ref)
    for name, tensors in checkpoints(ref_out).items():  # bit for bit
        mine = checkpoints(out)[name]
        assert all(torch.equal(tensors[k], mine[k]) for k in tensors), name
    assert not list((out / "checkpoints").glob("*.state.safetensors"))


@pytest.mark.parametrize("method", ["coop", "provp"])
def test_a_run_stopped_mid_epoch_resumes_at_that_step(world, tmp_path, uninterrupted, monkeypatch, method):
    import vlprompt_core.engine.checkpoints as engine  # where a pair's training state is saved

    ref, _ = uninterrupted
    out = tmp_path / "out"
    saves = []
    save = engine.save_state

    def save_then_stop(path, m, optimizer, data_state, position, log, identity):
        save(path, m, optimizer, data_state, position, log, identity)
        if identity["method"] == method and position.step:
            saves.append((position.epoch, position.step))
        if len(saves) == 3:
            raise KeyboardInterrupt  # killed right after the third mid-epoch save of this method

    monkeypatch.setattr(engine, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(registry(world), spec(world, out, METHODS, checkpoint_every=1))
    monkeypatch.setattr(engine, "save_state", save)
    logs: list[str] = []
    record = run(registry(world), spec(world, out, METHODS, checkpoint_every=1), logs)
    assert any("resuming after step 1 of epoch 2 of 4" in line for line in logs), logs
    assert outcome(record) == outcome(ref)


def test_a_state_of_other_settings_is_not_resumed(world, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(registry(world, ("stop", Interrupt("coop", 1))), spec(world, out, [{"name": "coop", "n_ctx": 2}]))
    (state,) = (out / "checkpoints").glob("*.state.safetensors")
    logs: list[str] = []
    run(registry(world), spec(world, out, [{"name": "coop", "n_ctx": 2}], lr=0.01), logs)  # another key
    assert not any("resuming" in line for line in logs)


SCRIPT = """
import os, sys
os.environ["VLPROMPT_DATASETS_SPEC"] = {specs!r}
from vlprompt_core.cli import main
if {progress!r}:  # a line on stdout at the end of every epoch (after its state is saved)
    import vlprompt_core.plugins as plugins
    from vlprompt_core import hookimpl

    class Progress:
        @hookimpl
        def vlprompt_epoch_end(self, method, seed, epoch, metrics):
            print({marker!r}, flush=True)

    plugins._REGISTRY = plugins.build_registry(*plugins.make_plugin_manager(extra=(("progress", Progress()),)))
sys.argv = ["vlprompt", "run", {spec!r}]
main()
"""
EPOCH_DONE = "-- epoch done --"


def cli_run(world, spec_file: Path, progress: bool = False) -> ForkedProcess:
    """``vlprompt run spec_file`` in a process of its own (forked, without starting Python
    again: :func:`test_cli.start_forked_python`); ``progress``: it prints
    :data:`EPOCH_DONE` at the end of every epoch."""
    code = SCRIPT.format(specs=str(world["specs"]), spec=str(spec_file), progress=progress, marker=EPOCH_DONE)
    return start_forked_python(code, dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


def kill_during_epoch(proc: ForkedProcess, epochs: int, rng: random.Random) -> bool:
    """SIGKILL ``proc`` at a random moment of the epoch after its ``epochs``-th (>= 2)
    finished one: a random fraction of the last epoch's time after it ended. Moments are
    set by the run's own progress, whatever the machine's speed; False if the run ended
    first."""
    ended = []
    for line in proc.stdout:
        if line.strip() == EPOCH_DONE:
            ended.append(time.perf_counter())
            if len(ended) == epochs:
                time.sleep(rng.uniform(0, 1) * (ended[-1] - ended[-2]))
                break
    killed = len(ended) == epochs and proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return killed


@pytest.mark.slow  # five processes of `vlprompt run`
def test_kill_9_at_random_moments_then_the_same_command_gives_the_same_metrics(world, tmp_path):
    methods = [{"name": "coop", "n_ctx": 2}, {"name": "provp", "n_prompts": 2}]
    ref_file = tmp_path / "ref.yaml"
    ref_file.write_text(yaml.safe_dump(spec(world, tmp_path / "ref", methods, epochs=6)))
    ref = vlprompt("run", str(ref_file), env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])})  # not killed
    assert ref.returncode == 0, ref.stderr

    killed_file = tmp_path / "killed.yaml"
    killed_file.write_text(yaml.safe_dump(spec(world, tmp_path / "killed", methods, epochs=6,
                                               checkpoint_every=1)))  # kills land mid-epoch too
    rng = random.Random(12)
    kills = 0
    for _ in range(4):  # each process runs 2 to 5 of the 24 epochs (2 methods x 2 seeds x 6)
        kills += kill_during_epoch(cli_run(world, killed_file, progress=True), rng.randint(2, 4), rng)
    assert kills >= 2
    final = cli_run(world, killed_file)
    assert final.wait() == 0, final.stderr.read()
    ref_record = json.loads((tmp_path / "ref" / "results.json").read_text())
    record = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert record["status"] == "complete"
    assert outcome(record) == outcome(ref_record)


# ------------------------------------------------------------------ one run per folder


def test_a_second_run_on_a_folder_in_use_refuses_naming_the_holder(world, tmp_path):
    out = tmp_path / "out"
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(spec(world, out, [{"name": "zeroshot"}])))
    with FolderLock(out):
        proc = cli_run(world, spec_file)
        assert proc.wait() == 2
        stderr = proc.stderr.read()
    assert f"in use by process {os.getpid()}" in stderr and "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.slow  # three processes of `vlprompt run`
def test_two_runs_on_one_folder_one_refuses_and_a_killed_runs_lock_is_taken_over(world, tmp_path):
    out = tmp_path / "out"
    long_file = tmp_path / "long.yaml"
    long_file.write_text(yaml.safe_dump(spec(world, out, [{"name": "coop", "n_ctx": 2}], epochs=500)))
    first = cli_run(world, long_file)
    while first.poll() is None:  # until the first run holds the folder
        lock = out / LOCK_NAME
        if lock.is_file() and lock.read_text() and json.loads(lock.read_text()).get("pid") == first.pid:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the first run ended before it took the folder: {first.stderr.read()}")
    second = cli_run(world, long_file)
    assert second.wait() == 2
    assert f"in use by process {first.pid}" in second.stderr.read()
    assert first.poll() is None  # the first one runs on
    first.send_signal(signal.SIGKILL)
    first.wait()
    short_file = tmp_path / "short.yaml"
    short_file.write_text(yaml.safe_dump(spec(world, out, [{"name": "coop", "n_ctx": 2}], epochs=1, seeds=[1])))
    third = cli_run(world, short_file)
    assert third.wait() == 0, third.stderr.read()
    assert f"taking over the lock of process {first.pid}, which is no longer running" in third.stderr.read()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from vlprompt_core.lock import FolderLock\n"
        f"lock = FolderLock({str(tmp_path)!r}).__enter__(); print('locked', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # holds the lock until killed
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
        with FolderLock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lines: list[str] = []
    with FolderLock(tmp_path, log=lines.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lines == [f"{tmp_path}: taking over the lock of process {holder.pid}, which is no longer running"]


# ------------------------------------------------------------------ failures


def test_a_non_finite_loss_stops_that_pair_only(world, tmp_path):
    logs: list[str] = []
    record = run(registry(world), spec(world, tmp_path / "o", [{"name": "toy_nan"}, {"name": "coop", "n_ctx": 2}],
                                       lr=0.004), logs)
    assert record["status"] == "failed"
    assert {(r["method"], r["seed"]) for r in record["runs"]} == {("coop", 1), ("coop", 2)}
    assert [(f["method"], f["seed"]) for f in record["failures"]] == [("toy_nan", 1), ("toy_nan", 2)]
    msg = record["failures"][0]["error"]
    assert msg.startswith("toy_nan seed 1: the loss became nan in epoch 2 of 4 at learning rate 0.004")
    assert json.loads((tmp_path / "o" / "results.json").read_text())["failures"] == record["failures"]


def test_an_exception_in_a_method_names_its_plugin_and_the_run_goes_on(world, tmp_path):
    record = run(registry(world), spec(world, tmp_path / "o", [{"name": "toy_crash"}, {"name": "zeroshot"}]))
    (first, second) = record["failures"]
    assert "method 'toy_crash' from plug-in faults ((registered in-process) -)" in first["error"]
    assert "RuntimeError: the toy crashed" in first["error"]
    assert "Traceback" in (tmp_path / "o" / "errors.log").read_text()
    assert [r["method"] for r in record["runs"]] == ["zeroshot", "zeroshot"]


def test_a_failing_logger_hook_is_reported_and_does_not_stop_the_run(world, tmp_path):
    logger = FailingLogger()
    logs: list[str] = []
    record = run(registry(world, ("badlogger", logger)), spec(world, tmp_path / "o", [{"name": "coop", "n_ctx": 2}]),
                 logs)
    assert record["status"] == "complete" and logger.calls == 2 * 4
    warnings = [line for line in logs if "failed in vlprompt_epoch_end" in line]
    assert len(warnings) == 8
    assert warnings[0] == ("warning: plug-in badlogger ((registered in-process) -) failed in vlprompt_epoch_end: "
                           "ValueError: the logging server is down")


def test_a_backbone_that_cannot_load_marks_the_results_failed(world, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(PluginError, match="backbone 'broken' from plug-in faults .* RuntimeError: weights are corrupt"):
        run(registry(world), spec(world, out, [{"name": "zeroshot"}], backbone={"name": "broken"}))
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "failed" and "weights are corrupt" in record["error"]


def test_the_cli_reports_failed_pairs_in_one_line_each_and_exits_1(world, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import vlprompt_core.plugins as plugins
    from vlprompt_core.cli import app

    monkeypatch.setattr(plugins, "_REGISTRY", registry(world))
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(spec(world, tmp_path / "o", [{"name": "toy_nan"}, {"name": "zeroshot"}],
                                             seeds=[1])))
    result = CliRunner().invoke(app, ["run", str(spec_file)])
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert failed == ["failed: toy_nan seed 1: the loss became nan in epoch 2 of 4 at learning rate 0.002; try a "
                      "lower train.lr (the other pairs go on)"]
    assert "zeroshot" in result.stdout  # the pairs that finished are in the table


class Counting(NanLoss):
    """Python state that changes while training, saved through get_extra_state."""

    def get_extra_state(self):
        return {"epoch": self.epoch}

    def set_extra_state(self, state):
        self.epoch = state["epoch"]


def test_extra_state_of_a_method_is_saved_and_restored(world, tmp_path, tiny_backbone):
    from vlprompt_core.api import ClassSet
    from vlprompt_core.engine import make_optimizer, optimizer_groups
    from vlprompt_core.spec import TrainSpec
    from vlprompt_core.trainstate import Position, load_state, save_state

    def build():
        m = Counting(tiny_backbone, ClassSet(["a", "b"]), FaultOptions(fail_in_epoch=99))
        return m, make_optimizer(optimizer_groups(m), TrainSpec()), torch.Generator().manual_seed(0)

    m, opt, gen = build()
    m.on_epoch_end(4, 10)
    identity = {"method": "counting", "key": "k", "seed": "1", "options": "{}"}
    save_state(tmp_path / "s.safetensors", m, opt, gen.get_state(), Position(4), [{"epoch": 4}], identity)
    fresh, opt2, gen2 = build()
    assert fresh.epoch == 0
    position, log = load_state(tmp_path / "s.safetensors", fresh, opt2, gen2, identity)
    assert (position.epoch, position.step, log) == (4, 0, [{"epoch": 4}])
    assert fresh.epoch == 5
    assert load_state(tmp_path / "s.safetensors", fresh, opt2, gen2, {**identity, "seed": "2"}) is None
