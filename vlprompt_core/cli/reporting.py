"""``vlprompt report``: the report of results folders written and its tables printed
(also what ``vlprompt sweep`` calls at the end)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from ..errors import UserError
from .common import _fail, _one_line, _registry, app, err, out


@app.command()
def report(dirs: list[Path] = typer.Argument(..., help="folders searched (recursively) for results.json files"),
           output: Path = typer.Option(None, "--output", "-o", help="where the report goes (default: "
                                       "<first folder>/report)"),
           paper: bool = typer.Option(False, "--paper", help="show the published numbers that methods declare "
                                      "beside the measured ones, with the difference"),
           formats: str = typer.Option("png,svg", "--format", help="figure formats, comma-separated: png, svg")):
    """Tables (Markdown, CSV, LaTeX) and figures from every results.json under DIRS:
    one row per method (per settings, where a method label ran under several), seeds
    pooled across folders, cost beside accuracy."""
    from ..report import parse_formats

    try:
        _report(dirs, output or dirs[0] / "report", parse_formats(formats), paper)
    except UserError as exc:
        _fail(exc)


def _report(dirs: list[Path], output: Path, formats: list[str], paper: bool = False) -> None:
    """Write the report of ``dirs`` to ``output`` and print its tables. A folder that
    cannot be written is one :class:`UserError` line before anything is read (exit code
    2), a file the file system refuses while writing one :class:`StorageError` line."""
    from ..errors import StorageError, os_error, storage_problem
    from ..report import published_numbers, rich_tables, summary_lines, write_report
    from ..spec import folder_problem

    def warn(line: str) -> None:
        err.print(Text.assemble(("warning:", "yellow"), " ", _one_line(line)), soft_wrap=True)

    elsewhere = "give the report another folder (vlprompt report --output)"
    if (wrong := folder_problem(Path(output))) is not None:
        raise UserError(f"{wrong}: the report cannot be written there; {elsewhere}")
    published = published_numbers(_registry()) if paper else None
    try:
        done = write_report(dirs, output, formats, warn, published)
    except OSError as exc:
        raise StorageError(storage_problem(os_error(exc, output), elsewhere)) from None
    for line in summary_lines(done.study):
        out.print(Text(line), soft_wrap=True)
    for table in done.tables:
        for part in rich_tables(table, out.width):
            out.print(part)
    out.print(Text("written:\n" + "\n".join(f"  {path}" for path in done.written)), soft_wrap=True)
