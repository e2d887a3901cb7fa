"""The CLI end to end: every protocol through ``vlprompt run`` on a generated
split-file dataset with a tiny open_clip model, and what users see on mistakes."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml


def vlprompt(*args: str, env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``vlprompt ARGS`` as in CI, run in this process (a subprocess would import torch
    again, ~2 s a call), as a fresh process would run it: the plug-in registry built
    again, ``env_extra`` set, no terminal size, output to pipes (stdout and stderr
    apart). What Python would print on stderr is there too: the traceback of an
    exception that escapes the CLI (exit code 1), warnings (a fresh interpreter's
    filters), log records of level WARNING or more. The same answer as
    :func:`vlprompt_process`, which is for tests of the process itself (the executable,
    signals, other ``site-packages``, worker processes' output)."""
    import traceback
    import warnings

    from typer.testing import CliRunner

    import vlprompt_core.plugins as plugins
    from vlprompt_core.cli import app

    cwd_before = os.getcwd()  # a command may change it (a sweep's runs: to their sweep file's folder)
    log = _LogToStderr()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        for name in ("COLUMNS", "LINES"):
            mp.delenv(name, raising=False)
        for name, value in {"HF_HUB_OFFLINE": "1", **(env_extra or {})}.items():
            mp.setenv(name, value)
        mp.setattr(plugins, "_REGISTRY", None)  # the installed plug-ins, as a fresh process sees them
        warnings.simplefilter("default")  # each warning once, but those a fresh interpreter ignores
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        logging.getLogger().addHandler(log)
        try:
            if cwd is not None:
                os.chdir(cwd)
            result = CliRunner().invoke(app, list(args), prog_name="vlprompt")
        finally:
            logging.getLogger().removeHandler(log)
            os.chdir(cwd_before)
    stderr = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    stderr += result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
        code = 1
    return subprocess.CompletedProcess(["vlprompt", *args], code, result.stdout, stderr)


class _LogToStderr(logging.Handler):
    """Log records of level WARNING or more written to ``sys.stderr`` of the moment (the
    CLI's captured stderr), as the CLI's ``logging.basicConfig`` or Python's last-resort
    handler writes them in a process of its own."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        sys.stderr.write(self.format(record) + "\n")


def vlprompt_process(*args: str, env_extra: dict | None = None, cwd: Path | None = None,
                     executable: bool = False) -> subprocess.CompletedProcess:
    """``vlprompt ARGS`` in a process of its own, output to pipes, no terminal size set
    (``COLUMNS``); ``executable``: the ``vlprompt`` console script installed beside this
    Python (what a user types), else ``python -m vlprompt_core.cli``."""
    return finish(start_vlprompt_process(*args, env_extra=env_extra, cwd=cwd, executable=executable))


def start_vlprompt_process(*args: str, env_extra: dict | None = None, cwd: Path | None = None,
                           executable: bool = False) -> subprocess.Popen:
    """:func:`vlprompt_process` started, not waited for: :func:`finish` waits for it."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(HF_HUB_OFFLINE="1", **(env_extra or {}))
    command = [str(Path(sys.executable).with_name("vlprompt"))] if executable else [sys.executable, "-m",
                                                                                     "vlprompt_core.cli"]
    return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a process of :func:`start_vlprompt_process`; what it printed, its exit code."""
    stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


#: What the fork server (:func:`start_forked_python`) imports once, for every process it
#: forks; the installed plug-ins' modules too.
FORK_PRELOAD = ["torch", "open_clip", "vlprompt_kernels", "vlprompt_core.cli", "vlprompt_core.plugins", "test_cli"]


def _fork_preload() -> list[str]:
    from importlib.metadata import entry_points

    from vlprompt_core.plugins import ENTRY_POINT_GROUP

    return FORK_PRELOAD + sorted({ep.module for ep in entry_points(group=ENTRY_POINT_GROUP)})


def start_forked_python(code: str, env: dict[str, str], cwd: Path | None = None) -> ForkedProcess:
    """``python -c CODE`` as a process of its own (a pid to signal, kill -9 or wait for;
    output to pipes), with exactly the environment ``env``, in ``cwd``, but forked from a
    server that has imported torch, vlprompt and its plug-ins once (:data:`FORK_PRELOAD`; started with
    the first call, one per test process) instead of starting Python and importing them
    again (~2 CPU s each time). As in a fresh process, nothing has run but imports: the
    modules imported saw this process's environment (``OMP_NUM_THREADS``, ``HF_HUB_OFFLINE``
    and ``TRITON_INTERPRET`` as ``conftest.py`` sets them); the code sees ``env``. Its exit
    code is what ``sys.exit`` gave (1 after an uncaught exception, its traceback on
    stderr), ``-N`` when signal N ended it, as :class:`subprocess.Popen` says."""
    import multiprocessing
    from multiprocessing.connection import Connection

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_fork_preload())  # read when the server starts: the first call
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ends = Connection(out_w, readable=False), Connection(err_w, readable=False)  # sent to the fork
    # not a daemon: a run may start worker processes of its own (a parallel sweep)
    process = context.Process(target=_forked_main, args=(code, dict(env), str(cwd) if cwd else None, *ends))
    try:
        process.start()
    finally:
        for end in ends:
            end.close()  # the forked process holds its own copies
    forked = ForkedProcess(process, os.fdopen(out_r), os.fdopen(err_r))
    _FORKED.append(forked)
    return forked


def _forked_main(code: str, env: dict, cwd: str | None, stdout, stderr) -> None:
    """In the forked process: its output to the pipes, its environment, folder and
    ``sys.argv`` as ``python -c CODE`` would have them, then the code."""
    os.dup2(stdout.fileno(), 1)
    os.dup2(stderr.fileno(), 2)
    stdout.close()
    stderr.close()
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = ["-c"]
    main = sys.modules["__main__"] = types.ModuleType("__main__")  # as -c has it: no file, no spec
    main.__spec__ = None
    exec(compile(code, "<string>", "exec"), main.__dict__)


class ForkedProcess:
    """A process of :func:`start_forked_python`, used as a :class:`subprocess.Popen`
    (text output): ``pid``, ``stdout``, ``stderr``, ``returncode``, ``poll``, ``wait``,
    ``send_signal``, ``communicate``."""

    def __init__(self, process, stdout, stderr):
        self._process = process
        self.pid = process.pid
        self.stdout, self.stderr = stdout, stderr
        self.returncode = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self) -> int:
        self._process.join()
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def communicate(self) -> tuple[str, str]:
        """The rest of its output (both pipes read at once), once it has ended."""
        import threading

        err: list[str] = []
        reader = threading.Thread(target=lambda: err.append(self.stderr.read()))
        reader.start()
        out = self.stdout.read()
        reader.join()
        self.stdout.close()
        self.stderr.close()
        self.wait()
        return out, err[0]


_FORKED: list[ForkedProcess] = []


@atexit.register
def _kill_forked_left_running() -> None:
    """Processes a failed test left running are killed as this process exits (else
    multiprocessing would wait for them)."""
    for forked in _FORKED:
        if forked.poll() is None:
            os.kill(forked.pid, signal.SIGKILL)
            forked.wait()


def write_spec(path: Path, world, protocol: dict, method=None, **extra) -> Path:
    spec = {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method or [{"name": "zeroshot"}, {"name": "coop", "n_ctx": 2}],
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": protocol,
        "train": {"epochs": 2, "batch_size": 4, "seeds": [1, 2]},
        "output": str(path.parent / "out"),
    }
    spec.update(extra)
    path.write_text(yaml.safe_dump(spec))
    return path


TARGETS = lambda world: [{"name": "toy_shift", "root": str(world["data"])}]  # noqa: E731

PROTOCOLS = {
    "few_shot": (lambda w: {"name": "few_shot", "shots": 2}, ["accuracy"]),
    "base2novel": (lambda w: {"name": "base2novel", "shots": 2}, ["base", "novel", "H"]),
    "cross_dataset": (lambda w: {"name": "cross_dataset", "shots": 2, "targets": TARGETS(w)},
                      ["toy (source)", "toy_shift", "average"]),
    "domain_generalisation": (lambda w: {"name": "domain_generalisation", "shots": 2, "targets": TARGETS(w)},
                              ["toy (source)", "toy_shift", "average"]),
}


@pytest.mark.slow  # `vlprompt run`, two methods, two seeds
@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_each_protocol_runs_end_to_end(protocol, world, tmp_path):
    make, metrics = PROTOCOLS[protocol]
    spec = write_spec(tmp_path / "spec.yaml", world, make(world))
    proc = vlprompt("run", str(spec), env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])})
    assert proc.returncode == 0, proc.stderr
    assert "coop" in proc.stdout and "zeroshot" in proc.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "complete"
    assert results["spec"]["protocol"]["name"] == protocol
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {
        (m, s) for m in ("zeroshot", "coop") for s in (1, 2)
    }
    for label in ("zeroshot", "coop"):
        summary = results["summary"][label]
        assert list(summary) == metrics
        for m in metrics:
            assert 0.0 <= summary[m]["mean"] <= 100.0 and summary[m]["n"] == 2
    # stderr is a pipe here, not a terminal: each finished step is one plain line instead of a bar
    for seed in (1, 2):
        assert re.search(rf"^coop seed {seed}: train: done in [0-9.]+ s$", proc.stderr, re.M), proc.stderr
    assert not re.search(r"^zeroshot seed 1: train", proc.stderr, re.M)  # nothing to train
    extracted = re.findall(r"^features: (.+): done in", proc.stderr, re.M)  # once per test set, for all
    assert extracted and len(extracted) == len(set(extracted)), proc.stderr
    coop_runs = [r for r in results["runs"] if r["method"] == "coop"]
    assert all(r["cost"]["trainable_parameters"] == 2 * 32 for r in coop_runs)
    for r in results["runs"]:  # what every pair cost, and the run table shows it
        cost = r["cost"]
        assert cost["memory"] == "rss" and cost["peak_memory_mb"] > 100  # torch alone holds more
        assert cost["time_s"]["total"] == pytest.approx(sum(v for k, v in cost["time_s"].items() if k != "total"))
        assert cost["eval_images_per_s"] > 0
        assert (cost["train_images_per_s"] is None) == (r["method"] == "zeroshot")
    header = next(line for line in proc.stdout.splitlines() if "method" in line)
    assert "time / seed" in header and "memory" in header, proc.stdout
    for label in ("zeroshot", "coop"):
        row = next(line for line in proc.stdout.splitlines() if f" {label} " in line)
        assert re.search(r"\d+\.\d s .* [\d,]+ MB", row), row
        # not a terminal (a log): the table whole, each row on one line, no cell wrapped
        assert len(re.findall(r"\d+\.\d\d ± \d+\.\d\d", row)) == len(metrics), proc.stdout
    table = proc.stdout.split("results: ", 1)[0]
    assert len([line for line in table.splitlines() if "±" in line and "mean ± std" not in line]) == 2, table
    assert all((tmp_path / "out" / r["checkpoint"]).is_file() for r in coop_runs)
    fewshot = json.loads((tmp_path / "out" / "fewshot" / "seed1.json").read_text())
    assert len(fewshot["train"]) == 6 * 2  # 2 shots x 6 classes, saved with the run
    if protocol == "base2novel":
        for r in results["runs"]:
            b, n = r["accuracy"]["base"], r["accuracy"]["novel"]
            assert r["summary"]["H"] == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n))


def test_the_run_table_is_printed_whole_in_a_log(world, tmp_path):
    """Wider than 80 columns, written to a pipe with no terminal size known (CI, ``> log``):
    the table at the width it needs, every row on one line."""
    labels = ["zero-shot CLIP, the dataset's template", "zero-shot CLIP, the prompt ensemble"]
    spec = write_spec(tmp_path / "spec.yaml", world, {"name": "base2novel", "shots": 2},
                      method=[{"name": "zeroshot", "label": labels[0]},
                              {"name": "zeroshot", "label": labels[1], "templates": "ensemble"}])
    proc = vlprompt("run", str(spec), env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])})
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.split("results: ", 1)[0]
    for label in labels:
        rows = [line for line in table.splitlines() if label in line]
        assert len(rows) == 1, table
        row = rows[0]
        assert len(re.findall(r"\d+\.\d\d ± \d+\.\d\d", row)) == 3, table  # base, novel, H
        assert re.search(r"\d+\.\d s .* [\d,]+ MB", row), table
    assert len([line for line in table.splitlines() if "±" in line and "mean ± std" not in line]) == 2, table
    assert max(len(line) for line in table.splitlines()) > 80  # not squeezed into 80 columns
    settings = proc.stderr.split("settings: spec > method recipe (*) > defaults", 1)[1]
    for label in labels:  # each method's settings on one line too
        (line,) = [line for line in settings.splitlines() if line.startswith(label)]
        assert "epochs" in line and "options: " in line, settings


def test_bad_spec_gives_one_line_per_problem_and_exit_2(world, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({
        "method": {"name": "coop", "n_ctxx": 4},
        "dataset": {"name": "toy", "root": str(tmp_path / "nowhere")},
        "protocol": {"name": "few_shot", "shots": "many"},
        "train": {"epochs": -1},
        "surprise": 1,
    }))
    proc = vlprompt("validate", str(spec), env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert all(line.startswith("error: ") for line in lines), lines
    text = "\n".join(lines)
    for field in ("method.n_ctxx", "dataset.root", "protocol.shots", "train.epochs", "surprise"):
        assert f"{spec}: {field}:" in text, (field, text)
    assert len(lines) == 5


def test_unknown_method_name_lists_registered(world, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", world, {"name": "few_shot"}, method={"name": "cooop"})
    proc = vlprompt("run", str(spec), env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "method.name" in proc.stderr and "'cooop'" in proc.stderr and "coop" in proc.stderr


def test_missing_spec_file_and_invalid_yaml(tmp_path):
    proc = vlprompt("validate", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and "spec file not found" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    proc = vlprompt("validate", str(bad))
    assert proc.returncode == 2 and "invalid YAML" in proc.stderr and "line" in proc.stderr


def test_list_shows_builtins_and_coop_with_distributions(world):
    """Through the installed ``vlprompt`` executable (the console script users type; the
    other tests here run the CLI in this process)."""
    proc = vlprompt_process("list", "--json", env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])},
                            executable=True)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)["registered"]}
    assert rows[("backbone", "open_clip")]["distribution"] == "vlprompt"
    assert rows[("method", "zeroshot")]["distribution"] == "vlprompt"
    assert rows[("method", "coop")]["distribution"] == "vlprompt-plugin-coop"
    for protocol in ("few_shot", "base2novel", "cross_dataset", "domain_generalisation"):
        assert ("protocol", protocol) in rows
    for dataset in ("imagenet", "oxford_pets", "eurosat", "dtd", "toy"):
        assert ("dataset", dataset) in rows


def test_schema_includes_plugin_options():
    proc = vlprompt("schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    text = json.dumps(schema)
    assert "n_ctx" in text and "class_token_position" in text and "base2novel" in text
    assert set(schema["required"]) == {"method", "dataset", "protocol"}


@pytest.fixture()
def no_split_file(world, tmp_path):
    """A dataset spec whose folder exists but whose split file does not."""
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "nosplit.yaml").write_text(
        "name: nosplit\nlayout: split_file\nfolder: nosplit\nsplit_file: split_zhou_NoSplit.json\n"
        "classnames: [a, b]\n"
    )
    (tmp_path / "data" / "nosplit" / "images").mkdir(parents=True)
    return os.pathsep.join([str(world["specs"]), str(specs)]), tmp_path / "data"


@pytest.mark.parametrize("problem", ["unknown model", "missing checkpoint", "missing split file", "all three"])
def test_validate_checks_models_weights_and_split_files_before_running(world, tmp_path, no_split_file, problem):
    specs, data = no_split_file
    backbone = {"name": "open_clip", "model": str(world["config"]), "pretrained": None}
    dataset = {"name": "toy", "root": str(world["data"])}
    expected = []
    if problem in ("unknown model", "all three"):
        backbone["model"] = "no-such-model"
        expected.append("backbone.model: unknown open_clip model 'no-such-model'")
    if problem in ("missing checkpoint", "all three"):
        backbone["pretrained"] = str(tmp_path / "weights" / "missing.pt")
        if problem == "missing checkpoint":
            backbone["model"] = "ViT-B-32"
        expected.append(f"backbone.pretrained: checkpoint file not found: {tmp_path / 'weights' / 'missing.pt'}")
    if problem in ("missing split file", "all three"):
        dataset = {"name": "nosplit", "root": str(data)}
        expected.append(f"dataset: {data / 'nosplit' / 'split_zhou_NoSplit.json'}: split file not found")
    spec = write_spec(tmp_path / "spec.yaml", world, {"name": "few_shot"}, backbone=backbone, dataset=dataset)
    for command in ("validate", "run"):
        proc = vlprompt(command, str(spec), env_extra={"VLPROMPT_DATASETS_SPEC": specs})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == len(expected), lines
        for line, want in zip(lines, expected):
            assert line.startswith(f"error: {spec}: {want}"), (line, want)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_validate_prints_the_resolved_settings(world, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", world, {"name": "few_shot", "shots": 1},
                      method=[{"name": "coop", "n_ctx": 2}], train={"seeds": [1]})
    proc = vlprompt("validate", str(spec), env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])})
    assert proc.returncode == 0, proc.stderr
    assert "epochs 50*" in proc.stdout  # CoOp's recipe at 1 shot
    assert "n_ctx=2" in proc.stdout and proc.stdout.rstrip().endswith(f"{spec}: ok")


def _commands(command, path=()):
    """``(path, click command)`` of the CLI, groups included."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_texts_are_whole_paragraphs():
    """Hard-wrapped docstrings are reflowed: on a wide terminal every paragraph of a
    command's help is one line, in its own --help and in its group's command list."""
    import typer.main
    from typer.testing import CliRunner

    from vlprompt_core.cli import app

    paragraphs = lambda text: [" ".join(p.split()) for p in (text or "").split("\n\n") if p.strip()]  # noqa: E731
    for path, command in _commands(typer.main.get_command(app)):
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        wanted = paragraphs(command.help)
        wanted += [paragraphs(sub.help)[0] for sub in getattr(command, "commands", {}).values()]
        for text in wanted:
            assert any(text in line for line in lines), (path, text, [line.rstrip() for line in lines])
