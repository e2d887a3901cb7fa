"""``vlprompt data list`` and ``vlprompt data check``: which datasets are found where,
and what is wrong with one."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from ..errors import UserError
from .common import _fail, _registry, app, out

data_app = typer.Typer(no_args_is_help=True, help="Datasets: which are found where, and what is wrong with one.")
app.add_typer(data_app, name="data")

ROOT_HELP = "data root holding the dataset folders (default: $VLPROMPT_DATA, else ~/.cache/vlprompt/data)"


@data_app.command("list")
def data_list(root: Path = typer.Option(None, "--root", help=ROOT_HELP),
              as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Every dataset vlprompt knows: whether it is found under the root, and how many
    images each split has."""
    from ..datacheck import list_datasets
    from ..data import default_data_root

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
    from ..datacheck import check_named, check_section, prompt_problems
    from ..spec import dataset_sections, load_spec, resolve_methods

    try:
        reg = _registry()
        if name.endswith((".yaml", ".yml")) or Path(name).is_file():
            run_spec = load_spec(Path(name), reg)
            if root is not None:
                raise UserError("--root applies to a dataset name; a run spec gives each dataset's root")
            sections = dataset_sections(run_spec, reg)
            reports = [check_section(reg, section, sample) for _, section in sections]
            methods = resolve_methods(run_spec, reg)
            for at, report in zip(sections, reports):  # prompts against the backbone's text context
                if report.ok:
                    report.problems += prompt_problems(reg, run_spec.backbone, [at], methods)
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
