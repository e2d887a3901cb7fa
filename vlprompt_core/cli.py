"""``vlprompt``: run, validate, list, schema."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Prompt learning for CLIP-like models.")
out = Console()
err = Console(stderr=True)


def _fail(exc: UserError) -> None:
    for line in exc.problems:
        err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _registry():
    from .plugins import get_registry

    reg = get_registry()
    for f in reg.failures:
        err.print(f"[yellow]warning:[/yellow] plug-in {f.entry_point} ({f.distribution}) failed to load: {f.error}",
                  highlight=False, soft_wrap=True)
    return reg


@app.command()
def run(spec: Path = typer.Argument(..., help="run spec (YAML)"),
        output: Path = typer.Option(None, "--output", "-o", help="results folder (overrides the spec)")):
    """Train and evaluate what SPEC describes; write results.json and print the table."""
    from .engine import Engine
    from .engine import Progress as Hooks
    from .results import results_table
    from .spec import load_spec

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        reg = _registry()
        run_spec = load_spec(spec, reg)
        if output is not None:
            run_spec.output = output
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=err, transient=True) as bars:
            hooks = Hooks(
                start=lambda desc, total: bars.add_task(desc, total=total),
                advance=lambda task, n=1: bars.advance(task, n),
                stop=lambda task: bars.remove_task(task),
            )
            engine = Engine(run_spec, reg, hooks, log=lambda m: err.print(m, highlight=False))
            record = engine.run()
    except UserError as exc:
        _fail(exc)
    out.print(results_table(record["summary"], engine.title()))
    out.print(f"results: {engine.results_path}  ({record['time_s']['total']:.1f} s)", highlight=False)


@app.command()
def validate(spec: Path = typer.Argument(..., help="run spec (YAML)")):
    """Check SPEC without running it: one line per problem, exit code 2 if any."""
    from .spec import load_spec

    try:
        load_spec(spec, _registry())
    except UserError as exc:
        _fail(exc)
    out.print(f"{spec}: ok", highlight=False)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """What is registered, and from which distribution."""
    from .plugins import KINDS

    try:
        reg = _registry()
    except UserError as exc:
        _fail(exc)
    rows = [
        {"kind": kind, "name": name, "distribution": reg.sources[(kind, name)].distribution,
         "version": reg.sources[(kind, name)].version, "description": reg.get(kind, name).description}
        for kind in KINDS for name in reg.names(kind)
    ]
    failures = [f.__dict__ for f in reg.failures]
    if as_json:
        out.print_json(json.dumps({"registered": rows, "failed": failures}))
        return
    table = Table(title="vlprompt plug-ins")
    for col in ("kind", "name", "distribution", "version", "description"):
        table.add_column(col, no_wrap=col != "description")
    for r in rows:
        table.add_row(r["kind"], r["name"], r["distribution"], r["version"], r["description"])
    out.print(table)
    for f in reg.failures:
        out.print(f"[red]failed:[/red] {f.entry_point} ({f.distribution}): {f.error}", highlight=False)


@app.command()
def schema():
    """JSON Schema of the run spec, including every installed plug-in's options."""
    from .spec import build_spec_model

    try:
        model = build_spec_model(_registry())
    except UserError as exc:
        _fail(exc)
    sys.stdout.write(json.dumps(model.model_json_schema(), indent=2) + "\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
