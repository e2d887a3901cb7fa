"""``vlprompt sweep``: every combination of a grid over a base run spec, each run in a
folder of its own, and the sweep's report at the end."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ..errors import StorageError, UserError, os_error, storage_problem
from .common import _bars, _fail, _interrupted, _one_line, _registry, _reporter, app, err, out


@app.command()
def sweep(sweep_file: Path = typer.Argument(..., metavar="SWEEP", help="sweep file (YAML): a base run spec and a grid"),
          dry_run: bool = typer.Option(False, "--dry-run", help="list the runs (each checked) and run nothing"),
          executor: str = typer.Option("local", "--executor", help="local, or ray (needs "
                                    "pip install 'vlprompt\\[ray]')"),
          jobs: int = typer.Option(1, "--jobs", "-j", min=1, max=1024, help="local: runs at once, each in a process "
                                   "of its own"),
          address: str = typer.Option(None, "--address", help="ray: the cluster to join (default: a local Ray "
                                      "instance for the sweep)"),
          ray_cpus: int = typer.Option(None, "--ray-cpus", min=1, help="ray: cores of the local instance "
                                       "(default: all)"),
          report: bool = typer.Option(True, "--report/--no-report", help="write the sweep's report at the end")):
    """Run every combination of a grid over a base run spec, each in its own folder.

    Runs already finished with the same settings are skipped, so the same command
    continues an interrupted sweep. Exit code 1 if a run failed or was stopped (the
    others go on). Stopped itself (Ctrl-C, or SIGTERM from kill or a scheduler), the
    sweep stops its runs, each recording so, and exits with code 130 (143 for SIGTERM)."""
    from ..engine import stop_signals
    from ..executors import make_executor
    from ..sweep import axis_names, expand, load_sweep, run_sweep, short_value
    from .reporting import _report  # not at the top: importing it registers `report`, listed after `sweep`

    try:
        reg = _registry()
        plan = load_sweep(sweep_file)
        runs = expand(plan, reg, str(sweep_file))
        runner = make_executor(executor, jobs, address, plan.resources, ray_cpus)
    except UserError as exc:
        _fail(exc)
    if dry_run:
        table = Table(title=f"{len(runs)} runs in {plan.output}", title_justify="left", box=box.SIMPLE_HEAD)
        table.add_column("folder", overflow="fold")
        for axis in axis_names(list(plan.grid)).values():
            table.add_column(axis, no_wrap=True)
        table.add_column("state", no_wrap=True)
        for r in runs:
            table.add_row(Text(r.folder), *(Text(short_value(v)) for v in r.values.values()),
                          "done" if r.done() else "to run")
        out.print(table)
        return
    counts: dict[str, int] = {}
    try:
        with _bars() as bars:
            overall = bars.add_task(f"sweep ({runner.name})", total=len(runs))

            def ended(run, outcome):
                counts[outcome.status] = counts.get(outcome.status, 0) + 1
                bars.advance(overall)
                mark = {"complete": ("done", "green"), "skipped": ("skipped", "dim"),
                        "failed": ("failed", "red")}.get(outcome.status, (outcome.status, "yellow"))
                line = Text.assemble((mark[0], mark[1]), f" {run.folder}")
                if outcome.status != "skipped":
                    line.append(f" ({outcome.time_s:.1f} s)")
                if outcome.error:
                    line.append(": " + _one_line(outcome.error))
                err.print(line, soft_wrap=True)

            in_process = runner.name == "local" and jobs == 1
            with stop_signals():  # SIGTERM (kill, a scheduler) stops the sweep and its runs as Ctrl-C does
                outcomes = run_sweep(plan, runs, runner, str(sweep_file), ended,
                                     _reporter(bars) if in_process else None)
    except UserError as exc:
        _fail(exc)
    except OSError as exc:  # the sweep's own files (its lock, sweep.json): a full disk...
        _fail(StorageError(storage_problem(os_error(exc), "give the sweep another output folder (output: in the "
                                           "sweep file)") + "; then run the same command again to continue"))
    except KeyboardInterrupt as exc:
        _interrupted(exc, f"{plan.output / 'sweep.json'} says which runs finished; run the same command again to "
                          "continue")
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    out.print(Text(f"sweep: {len(runs)} runs ({summary}); index: {plan.output / 'sweep.json'}"), soft_wrap=True)
    if report and any(o.status in ("complete", "skipped") for o in outcomes.values()):
        try:
            _report([plan.output], plan.output / "report", ["png", "svg"])
        except UserError as exc:
            _fail(exc)
    if any(o.status in ("failed", "interrupted") for o in outcomes.values()):  # interrupted: its process was stopped
        raise typer.Exit(1)
