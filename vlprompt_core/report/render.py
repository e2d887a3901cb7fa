"""A report table as text: Markdown, CSV, LaTeX, and rich tables for the terminal."""

from __future__ import annotations

import csv
import io

from rich.table import Table as RichTable
from rich.text import Text

from .tables import Cell, Table


def markdown(table: Table) -> str:
    lines = [f"## {table.title}", "", "| method | " + " | ".join(table.columns) + " |",
             "|---" + "|---:" * len(table.columns) + "|"]
    lines += [f"| {row} | " + " | ".join(c.text() if c else "" for c in cells) + " |"
              for row, cells in table.rows.items()]
    return "\n".join(lines + ([f"\n{table.note}"] if table.note else [])) + "\n"


def csv_text(table: Table) -> str:
    """One line per row: ``<column> mean``, ``<column> std`` (blank with one seed) and,
    when published numbers are shown, ``<column> published`` and ``<column> diff``."""
    paper = any(c is not None and c.published is not None for cells in table.rows.values() for c in cells)
    fields = ["mean", "std"] + (["published", "diff"] if paper else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method"] + [f"{col} {f}" for col in table.columns for f in fields])
    for row, cells in table.rows.items():
        writer.writerow([row] + [v for c in cells for v in _csv_values(c, paper)])
    return buf.getvalue()


def _csv_values(c: Cell | None, paper: bool) -> list[str]:
    if c is None:
        return [""] * (4 if paper else 2)
    out = [repr(c.mean), "" if c.std is None else repr(c.std)]
    if paper:
        out += ["", ""] if c.published is None else [repr(c.published), repr(c.mean - c.published)]
    return out


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def latex(table: Table) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    def cell(c: Cell | None) -> str:
        return latex_escape(c.text()).replace("±", r"$\pm$") if c else ""

    lines = [f"% {latex_escape(table.title)}", r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join(["method"] + [latex_escape(c) for c in table.columns]) + r" \\", r"\midrule"]
    lines += [" & ".join([latex_escape(row)] + [cell(c) for c in cells]) + r" \\" for row, cells in table.rows.items()]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def rich_tables(table: Table, width: int) -> list[RichTable]:
    """``table`` for the terminal, its columns split over several tables where they
    would not fit in ``width`` characters."""
    texts = {row: [c.text() if c else "" for c in cells] for row, cells in table.rows.items()}
    label = max([len("method"), *(len(r) for r in texts)]) + 3
    chunks, current, used = [], [], label
    for i, col in enumerate(table.columns):
        need = max([len(col), *(len(t[i]) for t in texts.values())]) + 3
        if current and used + need > width:
            chunks.append(current)
            current, used = [], label
        current.append(i)
        used += need
    chunks.append(current)
    out = []
    for k, chunk in enumerate(chunks):
        part = f" ({k + 1}/{len(chunks)})" if len(chunks) > 1 else ""
        t = RichTable(title=Text(table.title + part), title_justify="left")
        t.add_column("method", style="bold", no_wrap=True)
        for i in chunk:
            t.add_column(Text(table.columns[i]), justify="right")
        for row, cells in texts.items():
            t.add_row(Text(row), *(cells[i] for i in chunk))  # Text: labels and folders are never markup
        out.append(t)
    return out
