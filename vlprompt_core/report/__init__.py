"""``vlprompt report``: tables and figures from the ``results.json`` files of a study.

Every finished (method, seed) pair found under the folders given is pooled by group
(protocol, dataset, backbone model, shots, targets) and row: one (method label,
settings key) of the group. A label run under several settings gives one row per
settings key, named ``label [folder]`` (:func:`row_names`); rows of different settings
are never pooled, whatever the folders given. A sweep over seeds that writes one folder
per seed is pooled into one row; a pair seen twice (same settings key and seed) counts
once. Layout of the output: docs/reports.md.

The package, one file per concern:

* :mod:`.collect` — reading the results files: pairs, groups, row names;
* :mod:`.tables` — the tables (cells, one per protocol, cost beside accuracy);
* :mod:`.render` — a table as Markdown, CSV, LaTeX or for the terminal;
* :mod:`.figures` — the figures (few-shot curves, bars) and how they are saved;
* :mod:`.paper` — ``--paper``: the published numbers beside the measured ones;
* here — the driver: :func:`write_report` reads, builds and writes it all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..api import Published
from ..errors import UserError
from .collect import Group, Pair, Study, read_study, results_files, row_names
from .figures import (DPI, FORMATS, MAX_PANEL_COLUMNS, PANEL_IN, base2novel_figure, few_shot_figure, figures,
                      save_figure, transfer_figure)
from .paper import PaperNumbers, published_numbers
from .render import csv_text, latex, latex_escape, markdown, rich_tables
from .tables import (COST_COLUMNS, Block, Cell, Table, base2novel_table, build_tables, cost_table, few_shot_table,
                     transfer_table)

__all__ = [
    "write_report", "Report", "parse_formats", "summary_lines",
    "read_study", "results_files", "row_names", "Study", "Pair", "Group",
    "build_tables", "few_shot_table", "base2novel_table", "transfer_table", "cost_table",
    "Table", "Cell", "Block", "COST_COLUMNS",
    "markdown", "csv_text", "latex", "latex_escape", "rich_tables",
    "figures", "few_shot_figure", "base2novel_figure", "transfer_figure", "save_figure",
    "FORMATS", "PANEL_IN", "DPI", "MAX_PANEL_COLUMNS",
    "PaperNumbers", "published_numbers",
]


@dataclass
class Report:
    study: Study
    tables: list[Table]
    written: list[Path]


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format: {', '.join(unknown) or 'nothing'} given; choose from {', '.join(FORMATS)} "
                        "(comma-separated)")
    return formats


def write_report(dirs: list[Path], output: Path, formats: list[str], warn: Callable[[str], None],
                 published: dict[str, tuple[Published, ...]] | None = None) -> Report:
    """Read the study under ``dirs`` and write ``output/report.md``,
    ``output/tables/<name>.csv|.tex`` and ``output/figures/<name>.<format>``; with
    ``published``, each measured mean is shown with the published value and the difference."""
    study = read_study(dirs, warn)
    names = row_names(study.pairs)
    built = build_tables(study.pairs, names, PaperNumbers(published))
    tables = [t for t, _ in built]
    (output / "tables").mkdir(parents=True, exist_ok=True)
    (output / "figures").mkdir(parents=True, exist_ok=True)
    written = [output / "report.md"]
    written[0].write_text(_report_markdown(study, tables, dirs))
    for table in tables:
        for suffix, text in ((".csv", csv_text(table)), (".tex", latex(table))):
            path = output / "tables" / f"{table.name}{suffix}"
            path.write_text(text)
            written.append(path)
    for name, fig in figures(built, names):
        written += save_figure(fig, output / "figures" / name, formats)
    return Report(study, tables, written)


def summary_lines(study: Study) -> list[str]:
    lines = [f"read {len(study.files)} results file(s): {len(study.pairs)} finished (method, seed) pair(s)"
             + (f", {study.duplicates} seen twice counted once" if study.duplicates else "")]
    lines += [f"incomplete ({status}): {path}" for path, status in study.incomplete]
    return lines


def _report_markdown(study: Study, tables: list[Table], dirs: list[Path]) -> str:
    head = ["# vlprompt report", "", "Results under: " + ", ".join(f"`{d}`" for d in dirs), ""]
    head += [f"- {line}" for line in summary_lines(study)]
    head += ["", "Accuracy in %, mean ± std over seeds (population std; no std with one seed).", ""]
    return "\n".join(head) + "\n" + "\n".join(markdown(t) for t in tables)
