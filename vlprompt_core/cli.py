"""``vlprompt``: run, eval, validate, list, schema, data list, data check."""

from __future__ import annotations

import json
import logging
import sys
import unicodedata
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Prompt learning for CLIP-like models.")
out = Console()
err = Console(stderr=True)


def _one_line(text: str) -> str:
    """``text`` as one printable line: line breaks, other control characters (a
    terminal would obey escape sequences) and lone surrogates written as escapes."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") else ch
        for ch in text
    )


def _fail(exc: UserError) -> None:
    """Print each problem as one ``error:`` line (its text verbatim, never read as
    markup: it may quote the spec) and exit with code 2."""
    for line in exc.problems:
        err.print(Text.assemble(("error:", "red"), " ", _one_line(line)), soft_wrap=True)
    raise typer.Exit(2)


def _registry():
    from .plugins import get_registry

    reg = get_registry()
    for f in reg.failures:
        err.print(Text.assemble(("warning:", "yellow"), " ", _one_line(
            f"plug-in {f.entry_point} ({f.distribution}) failed to load: {f.error}")), soft_wrap=True)
    return reg


def _prepare(spec: Path, output: Path | None):
    """Load, validate and check a spec (everything that can be told before running)."""
    from .spec import check_spec, load_spec

    reg = _registry()
    run_spec = load_spec(spec, reg)
    if output is not None:
        run_spec.output = output
    check_spec(run_spec, reg, str(spec))
    return reg, run_spec


def _bars() -> Progress:
    """Progress bars on stderr, removed when done."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=err, transient=True)


def _reporter(bars: Progress):
    """The engine's :class:`~vlprompt_core.engine.ProgressReporter` drawing on ``bars``."""
    from .engine import ProgressReporter

    def stop(task):
        if not err.is_terminal:  # no bars in a log file: one line per finished step instead
            done = next(t for t in bars.tasks if t.id == task)
            err.print(Text(f"{done.description}: done in {done.elapsed:.1f} s"), soft_wrap=True)
        bars.remove_task(task)

    return ProgressReporter(
        start=lambda desc, total: bars.add_task(desc, total=total),
        advance=lambda task, n=1: bars.advance(task, n),
        stop=stop,
    )


def _execute(spec: Path, output: Path | None, checkpoints_from: Path | None = None):
    from .engine import Engine, PluginError
    from .results import results_table, settings_table

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_spec = None
    try:
        reg, run_spec = _prepare(spec, output)
        with _bars() as bars:
            engine = Engine(run_spec, reg, _reporter(bars), log=lambda m: err.print(Text(m), soft_wrap=True))
            err.print(settings_table(engine.methods))
            record = engine.run(checkpoints_from=checkpoints_from)
    except UserError as exc:
        _fail(exc)
    except PluginError as exc:
        err.print(Text.assemble(("error:", "red"), " ", _one_line(str(exc))), soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        where = run_spec.output if run_spec is not None else "the results folder"
        err.print(f"interrupted: every finished epoch is saved in {where}; run the same command again to continue "
                  "from the last one", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    out.print(results_table(record["summary"], engine.title(), record["cost"]))
    out.print(f"results: {engine.results_path}  ({record['time_s']['total']:.1f} s)", highlight=False)
    if record["failures"]:
        for f in record["failures"]:
            err.print(Text.assemble(("failed:", "red"), " ", _one_line(f["error"])), soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def run(spec: Path = typer.Argument(..., help="run spec (YAML)"),
        output: Path = typer.Option(None, "--output", "-o", help="results folder (overrides the spec)")):
    """Train and evaluate what SPEC describes; write results.json and print the table.

    Pairs (method, seed) already in the results folder with the same settings are skipped."""
    _execute(spec, output)


@app.command("eval")
def eval_(spec: Path = typer.Argument(..., help="run spec (YAML)"),
          checkpoints: Path = typer.Option(None, "--from", help="results folder whose trained prompts are "
                                           "scored (default: the spec's own output folder)"),
          output: Path = typer.Option(None, "--output", "-o", help="results folder (overrides the spec)")):
    """Score prompts trained earlier, without training: the protocol, targets and
    classes are SPEC's, the prompts those trained under the same method labels and
    seeds in the --from folder. Results go to the spec's output folder, or to
    <folder>/eval when that is the --from folder itself."""
    from .spec import load_spec

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
    then show each method's resolved settings."""
    from .spec import resolve_methods
    from .results import settings_table

    try:
        reg, run_spec = _prepare(spec, None)
        methods = resolve_methods(run_spec, reg)
    except UserError as exc:
        _fail(exc)
    out.print(settings_table(methods))
    out.print(Text(f"{spec}: ok"), soft_wrap=True)


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
    continues an interrupted sweep. Exit code 1 if a run failed (the others go on)."""
    from .executors import make_executor
    from .sweep import axis_names, expand, load_sweep, run_sweep, short_value

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
            outcomes = run_sweep(plan, runs, runner, str(sweep_file), ended, _reporter(bars) if in_process else None)
    except UserError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err.print(f"interrupted: {plan.output / 'sweep.json'} says which runs finished; run the same command again "
                  "to continue", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    out.print(Text(f"sweep: {len(runs)} runs ({summary}); index: {plan.output / 'sweep.json'}"), soft_wrap=True)
    if report and any(o.status in ("complete", "skipped") for o in outcomes.values()):
        try:
            _report([plan.output], plan.output / "report", ["png", "svg"])
        except UserError as exc:
            _fail(exc)
    if any(o.status == "failed" for o in outcomes.values()):
        raise typer.Exit(1)


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
    # Two columns, so that the description gets the room an 80-column terminal has: the
    # name, and the description with where it comes from on a dim line under it. Names
    # get at most a third of the width; a longer one (names are typed in specs: never cut)
    # has a line of its own. Text from plug-ins is printed as is (never read as markup),
    # on printable lines.
    name_width = min(max((len(r["name"]) for r in rows), default=8) + 2, max(10, out.width // 3))

    def grid() -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(width=name_width, overflow="fold")
        table.add_column(overflow="fold")
        return table

    parts: list = [Text("vlprompt plug-ins", style="bold"), grid()]
    for i, kind in enumerate(KINDS):
        if i:
            parts[-1].add_row("", "")
        parts[-1].add_row(Text(f"{kind}s", style="bold"), "")
        mine = [r for r in rows if r["kind"] == kind]
        for r in mine:
            origin = "built-in" if r["distribution"] == "vlprompt" else f"{r['distribution']} {r['version']}"
            cell = Text(_one_line(r["description"] or ""))
            cell.append(("\n" if r["description"] else "") + _one_line(origin), style="dim")
            label = "  " + _one_line(r["name"])
            if len(label) > name_width:
                parts += [Text(label, overflow="fold"), grid()]
                label = ""
            parts[-1].add_row(Text(label), cell)
        if not mine:
            parts[-1].add_row(Text("  (none)", style="dim"), "")
    for part in parts:
        if not isinstance(part, Table) or part.row_count:
            out.print(part)
    for f in reg.failures:
        out.print(Text.assemble(("failed:", "red"), " ", _one_line(f"{f.entry_point} ({f.distribution}): {f.error}")))


data_app = typer.Typer(no_args_is_help=True, help="Datasets: which are found where, and what is wrong with one.")
app.add_typer(data_app, name="data")

ROOT_HELP = "data root holding the dataset folders (default: $VLPROMPT_DATA, else ~/.cache/vlprompt/data)"


@data_app.command("list")
def data_list(root: Path = typer.Option(None, "--root", help=ROOT_HELP),
              as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Every dataset vlprompt knows: whether it is found under the root, and how many
    images each split has."""
    from .datacheck import list_datasets
    from .data import default_data_root

    try:
        rows = list_datasets(_registry(), root)
    except UserError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in rows]))
        return
    where = Path(root).expanduser() if root else default_data_root()
    table = Table(title=f"datasets under {where}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, justify in (("name", "left"), ("classes", "right"), ("train", "right"), ("val", "right"),
                         ("test", "right"), ("status", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "status")
    for r in rows:
        counts = [f"{r.counts[s]:,}" if r.counts else "" for s in ("train", "val", "test")]
        state = r.state
        colour = {"found": "green", "not found": "yellow"}.get(r.state, "red" if r.state.startswith("error") else "")
        table.add_row(r.name, "" if r.classes is None else str(r.classes), *counts,
                      f"[{colour}]{state}[/{colour}]" if colour else state)
    out.print(table)


@data_app.command("check")
def data_check(name: str = typer.Argument(..., help="a dataset name (see `vlprompt data list`), or a run spec "
                                          "(YAML) whose datasets are checked"),
               root: Path = typer.Option(None, "--root", help=ROOT_HELP),
               sample: int = typer.Option(32, "--sample", min=0, help="images decoded per dataset")):
    """Check one dataset thoroughly: layout, split file, class list against the spec,
    every referenced image present, a sample decodable. Exit code 2 and one line per
    problem (with the fix) when something is wrong."""
    from .datacheck import check_named, check_section
    from .spec import dataset_sections, load_spec

    try:
        reg = _registry()
        if name.endswith((".yaml", ".yml")) or Path(name).is_file():
            run_spec = load_spec(Path(name), reg)
            if root is not None:
                raise UserError("--root applies to a dataset name; a run spec gives each dataset's root")
            reports = [check_section(reg, section, sample) for _, section in dataset_sections(run_spec, reg)]
        else:
            reports = [check_named(reg, name, root, sample)]
    except UserError as exc:
        _fail(exc)
    problems = []
    for report in reports:
        for line in report.lines:
            out.print(line, highlight=False, soft_wrap=True)
        for line in report.help:
            out.print(line, highlight=False, soft_wrap=True)
        problems += [f"{report.name}: {p}" for p in report.problems]
        if report.ok:
            out.print(f"[green]ok[/green]: {report.name}", highlight=False)
    if problems:
        _fail(UserError(*problems))


@app.command()
def schema():
    """JSON Schema of the run spec, including every installed plug-in's options."""
    from .spec import build_spec_model

    try:
        model = build_spec_model(_registry())
    except UserError as exc:
        _fail(exc)
    sys.stdout.write(json.dumps(model.model_json_schema(), indent=2) + "\n")


@app.command()
def report(dirs: list[Path] = typer.Argument(..., help="folders searched (recursively) for results.json files"),
           output: Path = typer.Option(None, "--output", "-o", help="where the report goes (default: "
                                       "<first folder>/report)"),
           paper: bool = typer.Option(False, "--paper", help="show the published numbers that methods declare "
                                      "beside the measured ones, with the difference"),
           formats: str = typer.Option("png,svg", "--format", help="figure formats, comma-separated: png, svg")):
    """Tables (Markdown, CSV, LaTeX) and figures from every results.json under DIRS:
    one row per method, seeds pooled across folders, cost beside accuracy."""
    from .report import parse_formats

    try:
        _report(dirs, output or dirs[0] / "report", parse_formats(formats), paper)
    except UserError as exc:
        _fail(exc)


def _report(dirs: list[Path], output: Path, formats: list[str], paper: bool = False) -> None:
    """Write the report of ``dirs`` to ``output`` and print its tables."""
    from .report import published_numbers, rich_tables, summary_lines, write_report

    def warn(line: str) -> None:
        err.print(Text.assemble(("warning:", "yellow"), " ", _one_line(line)), soft_wrap=True)

    published = published_numbers(_registry()) if paper else None
    done = write_report(dirs, output, formats, warn, published)
    for line in summary_lines(done.study):
        out.print(Text(line), soft_wrap=True)
    for table in done.tables:
        for part in rich_tables(table, out.width):
            out.print(part)
    out.print(Text("written:\n" + "\n".join(f"  {path}" for path in done.written)), soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
