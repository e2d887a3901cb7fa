"""``vlprompt run``, ``vlprompt eval`` and ``vlprompt validate``: one run spec,
trained and scored, scored only, or checked."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import typer
from rich.text import Text

from ..errors import UserError
from .common import _bars, _fail, _interrupted, _one_line, _print_whole, _registry, _reporter, app, err, out


def _prepare(spec: Path, output: Path | None):
    """Load, validate and check a spec (everything that can be told before running)."""
    from ..spec import check_spec, load_spec

    reg = _registry()
    notes: list[str] = []
    run_spec = load_spec(spec, reg, notes)
    for line in notes if os.environ.get("RANK", "0") == "0" else ():  # what `method: all` leaves out here
        err.print(Text(line), soft_wrap=True)
    if output is not None:
        from pydantic_core import PydanticCustomError

        from ..settings import folder

        try:
            run_spec.output = folder(output)  # a quoted ~ or $VAR, as in the spec's output
        except PydanticCustomError as exc:
            raise UserError(f"--output: {exc.message()}") from None
    check_spec(run_spec, reg, str(spec))
    return reg, run_spec


def _execute(spec: Path, output: Path | None, checkpoints_from: Path | None = None):
    """Run (or score) ``spec``: in this process, or, started by ``torchrun``, as one of
    the processes of a distributed run (:mod:`vlprompt_core.engine.distributed`), the main
    one printing the tables and progress, each one its own errors."""
    from ..engine import Engine, PluginError, ProgressReporter, stop_signals
    from ..engine.distributed import OtherProcessStopped, Strategy, from_environment
    from ..results import results_table, settings_table

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_spec = None
    strategy = Strategy()
    try:
        with stop_signals():  # SIGTERM (kill, a scheduler) stops the run as Ctrl-C does
            reg, run_spec = _prepare(spec, output)
            strategy = from_environment(run_spec.train.device)
            with _bars() if strategy.is_main else contextlib.nullcontext() as bars:
                reporter = _reporter(bars) if strategy.is_main else ProgressReporter()
                engine = Engine(run_spec, reg, reporter, log=lambda m: err.print(Text(m), soft_wrap=True),
                                strategy=strategy)
                if strategy.is_main:
                    _print_whole(err, settings_table(engine.methods))
                    _print_settled(err, engine.methods)
                record = engine.run(checkpoints_from=checkpoints_from)
    except OtherProcessStopped:
        raise typer.Exit(2) from None  # the main process said why
    except UserError as exc:
        if not strategy.is_main:
            exc.problems = [f"process {strategy.rank}: {line}" for line in exc.problems]
        _fail(exc)
    except PluginError as exc:
        who = "" if strategy.is_main else f"process {strategy.rank}: "
        err.print(Text.assemble(("error:", "red"), " ", _one_line(who + str(exc))), soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        if not strategy.is_main:
            from ..engine import exit_code

            raise typer.Exit(exit_code(exc)) from None
        where = run_spec.output if run_spec is not None else "the results folder"
        _interrupted(exc, f"every finished epoch is saved in {where}; run the same command again to continue "
                          "from the last one")
    finally:
        strategy.close()
    if not strategy.is_main:
        return
    _print_whole(out, results_table(record["summary"], engine.title(), record["cost"]))
    out.print(f"results: {engine.results_path}  ({record['time_s']['total']:.1f} s)", highlight=False)
    if record["failures"]:
        for f in record["failures"]:
            err.print(Text.assemble(("failed:", "red"), " ", _one_line(f["error"])), soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def run(spec: Path = typer.Argument(..., help="run spec (YAML)"),
        output: Path = typer.Option(None, "--output", "-o", help="results folder (overrides the spec)"),
        nproc: int = typer.Option(None, "--nproc", min=1, help="run data-parallel over this many processes "
                                  "(one per GPU), launched with torchrun")):
    """Train and evaluate what SPEC describes; write results.json and print the table.

    Pairs (method, seed) already in the results folder with the same settings are skipped.
    Stopped (Ctrl-C, or SIGTERM from kill or a scheduler), the run records it and exits
    with code 130 (143 for SIGTERM); the same command continues it.

    With --nproc N the run is spread over N processes on this machine, as
    'torchrun --standalone --nproc-per-node N -m vlprompt run SPEC' does (one GPU each, or
    the CPU): the same global batch, schedule and draws whatever N, so the results do not
    depend on N beyond float rounding, and a stopped run continues with any N."""
    if nproc is not None:
        _launch(spec, output, nproc)
    _execute(spec, output)


def _launch(spec: Path, output: Path | None, nproc: int) -> None:
    """``vlprompt run --nproc N``: the same command in ``N`` processes started by
    ``torchrun`` (``python -m torch.distributed.run --standalone``); exits with its code.
    A stop signal is passed on to it (each process records and exits as one run does)."""
    import signal
    import subprocess
    import sys

    from ..engine.distributed import launched
    from ..engine.strategy import batch_share_problem

    try:
        if launched():
            raise UserError("--nproc: this process was started by torchrun already; leave --nproc out")
        reg, run_spec = _prepare(spec, output)  # a wrong spec is told once, before any process starts
        from ..spec import resolve_methods

        sizes = [m.train.batch_size for m in resolve_methods(run_spec, reg)
                 if m.train.epochs > 0 and reg.get("method", m.name).trains]
        problem = batch_share_problem(min(sizes), nproc) if sizes else None
        if problem:
            raise UserError(f"--nproc {nproc}: {problem}")
    except UserError as exc:
        _fail(exc)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "vlprompt_core.cli", "run", str(spec), *(["--output", str(output)] if output is not None else [])]
    proc = subprocess.Popen(command)
    before = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum))
              for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    raise typer.Exit(128 - code if code < 0 else code)


@app.command("eval")
def eval_(spec: Path = typer.Argument(..., help="run spec (YAML)"),
          checkpoints: Path = typer.Option(None, "--from", help="results folder whose trained prompts are "
                                           "scored (default: the spec's own output folder)"),
          output: Path = typer.Option(None, "--output", "-o", help="results folder (overrides the spec)")):
    """Score prompts trained earlier, without training: the protocol, targets and
    classes are SPEC's, the prompts those trained under the same method labels and
    seeds in the --from folder. Results go to the spec's output folder, or to
    <folder>/eval when that is the --from folder itself."""
    from ..spec import load_spec

    try:
        own = Path(load_spec(spec, _registry()).output)
    except UserError as exc:
        _fail(exc)
    checkpoints = checkpoints or own
    if output is None and checkpoints.resolve() == own.resolve():
        output = own / "eval"
    _execute(spec, output, checkpoints_from=checkpoints)


@app.command()
def validate(spec: Path = typer.Argument(..., help="run spec (YAML)")):
    """Check SPEC without running it: one line per problem, exit code 2 if any;
    then show each method's resolved settings, and where a method uses other values on
    this backbone, which and why."""
    from ..spec import resolve_methods
    from ..results import settings_table

    try:
        reg, run_spec = _prepare(spec, None)
        methods = resolve_methods(run_spec, reg)
    except UserError as exc:
        _fail(exc)
    _print_whole(out, settings_table(methods))
    _print_settled(out, methods)
    out.print(Text(f"{spec}: ok"), soft_wrap=True)


def _print_settled(console, methods) -> None:
    """Where a method uses other settings than it was asked for on this backbone (a
    prompt depth clamped to a shallower tower...): one line each, with its notes."""
    for m in methods:
        for line in m.settled_lines():
            console.print(Text(_one_line(line)), soft_wrap=True)
