"""``vlprompt report``: tables and figures from the ``results.json`` files of a study.

Every finished (method, seed) pair found under the folders given is pooled by group
(protocol, dataset, backbone model, shots, targets) and row (method label; a label
run under several settings gives one row per settings key, named ``label [folder]``).
A sweep over seeds that writes one folder per seed is pooled into one row; a pair seen
twice (same settings key and seed) counts once. Layout of the output: docs/reports.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table as RichTable
from rich.text import Text

from .api import Published
from .builtin.protocols import harmonic_mean
from .errors import UserError
from .results import COST_FIGURES, cost_figure, mean_std

FORMATS = ("png", "svg")
PANEL_IN = (4.0, 3.5)  # one figure panel, inches
DPI = 100
MAX_PANEL_COLUMNS = 4


# ------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Group:
    """What makes numbers comparable: one column block of a table."""

    protocol: str
    dataset: str
    backbone: str
    shots: int | None
    targets: tuple[str, ...]


@dataclass
class Pair:
    """One finished (method, seed) pair of a results file."""

    group: Group
    label: str
    name: str
    key: str
    seed: int
    summary: dict[str, float]
    cost: dict | None
    folder: str  # the results folder, relative to the folder given on the command line


@dataclass
class Study:
    files: list[Path] = field(default_factory=list)
    incomplete: list[tuple[Path, str]] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    duplicates: int = 0


def _backbone(section: dict) -> str:
    """The backbone's model (a model config file by its stem), else its name."""
    model = section.get("model") or section["name"]
    return Path(model).stem if str(model).endswith(".json") else str(model)


def _group(spec: dict) -> Group:
    protocol = spec["protocol"]
    targets = tuple(t["name"] for t in protocol.get("targets") or ())
    return Group(protocol["name"], spec["dataset"]["name"], _backbone(spec["backbone"]), protocol.get("shots"), targets)


def _pairs(record: dict, folder: str) -> list[Pair]:
    group = _group(record["spec"])
    return [Pair(group, r["method"], r.get("name", r["method"]), r["key"], int(r["seed"]),
                 {k: float(v) for k, v in r["summary"].items()}, r.get("cost"), folder)
            for r in record["runs"]]


def results_files(dirs: list[Path]) -> list[tuple[Path, Path]]:
    """``(folder given, results.json)`` for every results file under ``dirs``
    (``results.<hash>.json`` files set aside by the engine are not read)."""
    found = []
    for folder in dirs:
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: not a folder")
        found += [(Path(folder), path) for path in sorted(Path(folder).rglob("results.json"))]
    return found


def read_study(dirs: list[Path], warn: Callable[[str], None]) -> Study:
    """Every finished pair in the results files under ``dirs``; a file that is not
    vlprompt results is one warning. No results at all is a :class:`UserError`."""
    study, seen = Study(), set()
    for root, path in results_files(dirs):
        try:
            record = json.loads(path.read_text())
            pairs = _pairs(record, os.path.relpath(path.parent, root))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warn(f"{path}: not a vlprompt results file, skipped ({type(exc).__name__}: {exc})")
            continue
        study.files.append(path)
        if record.get("status") != "complete":
            study.incomplete.append((path, str(record.get("status"))))
        for pair in pairs:
            if (pair.group, pair.key, pair.seed) in seen:
                study.duplicates += 1
                continue
            seen.add((pair.group, pair.key, pair.seed))
            study.pairs.append(pair)
    if not study.pairs:
        where = ", ".join(str(d) for d in dirs)
        raise UserError(f"no finished results under {where} (looked for results.json files written by 'vlprompt run')")
    return study


def row_names(pairs: list[Pair]) -> dict[int, str]:
    """Each pair's row: its label, or ``label [folder]`` where one label of a group
    has several settings keys (e.g. a sweep over learning rates)."""
    keys: dict[tuple[Group, str], set[str]] = {}
    folders: dict[tuple[Group, str, str], list[str]] = {}
    for p in pairs:
        keys.setdefault((p.group, p.label), set()).add(p.key)
        folders.setdefault((p.group, p.label, p.key), []).append(p.folder)
    names = {}
    for p in pairs:
        if len(keys[(p.group, p.label)]) == 1:
            names[id(p)] = p.label
        else:
            names[id(p)] = f"{p.label} [{os.path.commonpath(folders[(p.group, p.label, p.key)])}]"
    return names


# ------------------------------------------------------------------- tables


@dataclass
class Cell:
    mean: float
    std: float | None = None  # None: no spread to show (one seed, or an average over datasets)
    published: float | None = None
    fmt: str = "{:.2f}"

    def text(self) -> str:
        out = self.fmt.format(self.mean)
        if self.std is not None:
            out += " ± " + self.fmt.format(self.std)
        if self.published is not None:
            out += f" (paper {self.published:.2f}, {self.mean - self.published:+.2f})"
        return out


def _cell(values: list[float], published: float | None = None, fmt: str = "{:.2f}") -> Cell:
    s = mean_std(values)
    return Cell(s["mean"], s["std"] if s["n"] > 1 else None, published, fmt)


@dataclass
class Table:
    kind: str  # the protocol (few_shot, base2novel, ...) or "cost"
    name: str  # file stem
    title: str
    columns: list[str]
    rows: dict[str, list[Cell | None]]
    note: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


class PaperNumbers:
    """Published numbers by (method name, protocol, dataset, shots, backbone)."""

    def __init__(self, entries: dict[str, tuple[Published, ...]] | None):
        self.index = {(name, p.protocol, p.dataset, p.shots, _same(p.backbone)): p.metrics
                      for name, found in (entries or {}).items() for p in found}

    def get(self, name: str, group: Group, dataset: str, metric: str) -> float | None:
        found = self.index.get((name, group.protocol, dataset, group.shots, _same(group.backbone)), {})
        return found.get(metric)


def _same(backbone: str) -> str:
    """``ViT-B/16`` (the papers) and ``ViT-B-16`` (open_clip) name the same model."""
    return backbone.replace("/", "-").lower()


@dataclass
class Block:
    """The pairs of one table, by row and group."""

    pairs: list[Pair]
    names: dict[int, str]

    def rows(self) -> list[str]:
        return list(dict.fromkeys(self.names[id(p)] for p in self.pairs))

    def of(self, row: str, group: Group) -> list[Pair]:
        return [p for p in self.pairs if self.names[id(p)] == row and p.group == group]

    def groups(self) -> list[Group]:
        return sorted({p.group for p in self.pairs}, key=lambda g: (g.dataset, g.targets))


def _metric_cell(pairs: list[Pair], metric: str, paper: PaperNumbers, dataset: str) -> Cell | None:
    values = [p.summary[metric] for p in pairs if metric in p.summary]
    if not values:
        return None
    return _cell(values, paper.get(pairs[0].name, pairs[0].group, dataset, metric))


def few_shot_table(block: Block, backbone: str, shots: int, paper: PaperNumbers) -> Table:
    """Accuracy per dataset, and the average over datasets of the per-dataset means."""
    groups = block.groups()
    rows = {}
    for row in block.rows():
        cells = [_metric_cell(block.of(row, g), "accuracy", paper, g.dataset) for g in groups]
        average = Cell(sum(c.mean for c in cells) / len(cells)) if all(cells) else None
        rows[row] = [*cells, average]
    return Table("few_shot", f"few_shot-{_slug(backbone)}-{shots}shots", f"{shots}-shot accuracy ({backbone})",
                 [g.dataset for g in groups] + ["average"], rows,
                 "average: mean over datasets of the per-dataset means (blank unless the method ran on all)")


def base2novel_table(block: Block, backbone: str, shots: int, paper: PaperNumbers) -> Table:
    """Base, novel and H per dataset; the average row as in CoCoOp's Table 1: average
    base, average novel, and H of those two averages."""
    groups = block.groups()
    metrics = ("base", "novel", "H")
    rows = {}
    for row in block.rows():
        cells = [_metric_cell(block.of(row, g), m, paper, g.dataset) for g in groups for m in metrics]
        rows[row] = cells + _base2novel_average(cells[0::3], cells[1::3])
    return Table("base2novel", f"base2novel-{_slug(backbone)}-{shots}shots",
                 f"base-to-novel, {shots}-shot ({backbone})",
                 [f"{g.dataset} {m}" for g in groups for m in metrics] + ["average base", "average novel", "average H"],
                 rows, "average H: harmonic mean of the average base and average novel accuracies")


def _base2novel_average(base: list[Cell | None], novel: list[Cell | None]) -> list[Cell | None]:
    if not all(base) or not all(novel):
        return [None, None, None]
    b = sum(c.mean for c in base) / len(base)
    n = sum(c.mean for c in novel) / len(novel)
    return [Cell(b), Cell(n), Cell(harmonic_mean(b, n))]


def transfer_table(block: Block, group: Group, paper: PaperNumbers) -> Table:
    """One group's summary metrics (source, each target, average for the transfer protocols)."""
    columns = list(dict.fromkeys(m for p in block.pairs for m in p.summary))
    rows = {row: [_metric_cell(block.of(row, group), m, paper, group.dataset) for m in columns]
            for row in block.rows()}
    name = "-".join([group.protocol, group.dataset, *group.targets, _slug(group.backbone)])
    shots = f", {group.shots}-shot" if group.shots is not None else ""
    title = f"{group.protocol}: {group.dataset}{shots} ({group.backbone})"
    return Table(group.protocol, _slug(name), title, columns, rows)


#: Cost columns: (header, figure in results.COST_FIGURES, format of the mean).
COST_COLUMNS = (("time / pair (s)", "time_s", "{:.1f}"), ("peak memory (MB)", "peak_memory_mb", "{:,.0f}"),
                ("train images/s", "train_images_per_s", "{:,.1f}"), ("eval images/s", "eval_images_per_s", "{:,.1f}"),
                ("trainable parameters", "trainable_parameters", "{:,.0f}"))


def _cost_values(pairs: list[Pair], path: tuple[str, ...]) -> list[float]:
    return [float(v) for p in pairs if (v := cost_figure(p.cost, path)) is not None]


def cost_table(accuracy: Table, block: Block) -> Table:
    """What each row of ``accuracy`` cost, per (method, seed) pair, beside its headline
    accuracy (the table's last column); blank where results predate cost figures."""
    rows = {}
    for row, cells in accuracy.rows.items():
        pairs = [p for p in block.pairs if block.names[id(p)] == row]
        costs = [_cell(v, fmt=fmt) if (v := _cost_values(pairs, COST_FIGURES[f])) else None
                 for _, f, fmt in COST_COLUMNS]
        rows[row] = [cells[-1], *costs]
    columns = [accuracy.columns[-1]] + [h for h, _, _ in COST_COLUMNS]
    return Table("cost", f"{accuracy.name}-cost", f"cost: {accuracy.title}", columns,
                 rows, "cost: mean ± std over the (method, seed) pairs of the table; time is build + train + eval")


def _blocks(pairs: list[Pair], names: dict[int, str], key: Callable[[Pair], tuple]) -> dict[tuple, Block]:
    out: dict[tuple, list[Pair]] = {}
    for p in pairs:
        out.setdefault(key(p), []).append(p)
    order = lambda kv: [(v is None, v if isinstance(v, (int, float)) else str(v)) for v in kv[0]]  # noqa: E731 - 2 before 16
    return {k: Block(v, names) for k, v in sorted(out.items(), key=order)}


def build_tables(pairs: list[Pair], names: dict[int, str], paper: PaperNumbers) -> list[tuple[Table, Block]]:
    """Accuracy tables (few_shot and base2novel: per backbone and shots; any other
    protocol: per group), each followed by its cost table; each with its pairs."""
    tables = []
    by_table = _blocks(pairs, names, lambda p: (p.group.protocol, p.group.backbone, p.group.shots))
    for (protocol, backbone, shots), block in by_table.items():
        if protocol == "few_shot":
            tables.append((few_shot_table(block, backbone, shots, paper), block))
        elif protocol == "base2novel":
            tables.append((base2novel_table(block, backbone, shots, paper), block))
        else:
            for group in block.groups():
                mine = Block([p for p in block.pairs if p.group == group], names)
                tables.append((transfer_table(mine, group, paper), mine))
    return [pair for table, block in tables for pair in ((table, block), (cost_table(table, block), block))]


# ------------------------------------------------------------------ writing


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


# ------------------------------------------------------------------ figures


def _figure(panels: int, width_in: float | None = None):
    """A figure of ``panels`` axes on a grid of at most 4 columns, each panel 4 x 3.5 in
    at 100 dpi: ``(400 * columns) x (350 * grid rows)`` pixels (``width_in`` overrides
    the width of a one-panel figure)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cols = min(panels, MAX_PANEL_COLUMNS)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width_in or PANEL_IN[0] * cols, PANEL_IN[1] * rows), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def few_shot_figure(block: Block):
    """Accuracy against shots (log2 axis, the shots as ticks), one line per method with
    std error bars; one panel per dataset and an "Average" panel, as in CoOp's Figure 3.
    Size: (400 * min(n, 4)) x (350 * ceil(n / 4)) px for n = datasets + 1."""
    datasets = sorted({p.group.dataset for p in block.pairs})
    fig, axes = _figure(len(datasets) + 1)
    shots = sorted({p.group.shots for p in block.pairs})
    for row in block.rows():
        per_dataset = {}
        for ax, dataset in zip(axes, datasets):
            points = {}
            for k in shots:
                values = [p.summary["accuracy"] for p in block.pairs
                          if block.names[id(p)] == row and p.group.dataset == dataset and p.group.shots == k]
                if values:
                    points[k] = mean_std(values)
            per_dataset[dataset] = points
            _line(ax, row, {k: (s["mean"], s["std"]) for k, s in points.items()})
        average = {k: (sum(pts[k]["mean"] for pts in per_dataset.values()) / len(datasets), 0.0) for k in shots
                   if all(k in pts for pts in per_dataset.values())}
        _line(axes[-1], row, average)
    for ax, title in zip(axes, [*datasets, "Average"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        ax.set(title=title, xlabel="shots per class", ylabel="accuracy (%)")
    axes[-1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def _line(ax, label: str, points: dict[int, tuple[float, float]]) -> None:
    if points:
        xs = sorted(points)
        ax.errorbar(xs, [points[x][0] for x in xs], yerr=[points[x][1] for x in xs], label=label, marker="o",
                    capsize=3)


def _bars(ax, categories: list[str], series: dict[str, list[float | None]]) -> None:
    """Grouped bars: one group per category, one bar per series (missing values left out)."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label)
    slanted = len(categories) > 3  # long names would overlap
    ax.set_xticks(range(len(categories)), categories, rotation=30 if slanted else 0,
                  ha="right" if slanted else "center")
    ax.set_ylabel("accuracy (%)")


def base2novel_figure(table: Table):
    """Base / novel / H bars per dataset, and the average, one panel each.
    Size: (400 * min(n, 4)) x (350 * ceil(n / 4)) px for n = datasets + 1."""
    panels = [table.columns[i].rsplit(" ", 1)[0] for i in range(0, len(table.columns), 3)]
    fig, axes = _figure(len(panels))
    for j, (ax, title) in enumerate(zip(axes, panels)):
        series = {row: [c.mean if c else None for c in cells[3 * j: 3 * j + 3]] for row, cells in table.rows.items()}
        _bars(ax, ["base", "novel", "H"], series)
        ax.set_title(title)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def transfer_figure(table: Table):
    """Source, target and average accuracies as grouped bars, one panel.
    Size: max(400, 120 * columns) x 350 px."""
    fig, (ax,) = _figure(1, width_in=max(PANEL_IN[0], 1.2 * len(table.columns)))
    _bars(ax, table.columns, {row: [c.mean if c else None for c in cells] for row, cells in table.rows.items()})
    ax.set_title(table.title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path, formats: list[str]) -> list[Path]:
    """``path`` with each format's suffix; no dates or versions inside, so the same
    results give the same files."""
    import matplotlib

    written = []
    with matplotlib.rc_context({"svg.hashsalt": "vlprompt", "svg.fonttype": "path"}):
        for fmt in formats:
            target = path.with_suffix(f".{fmt}")
            metadata = {"Date": None} if fmt == "svg" else {"Software": None}
            fig.savefig(target, format=fmt, dpi=DPI, metadata=metadata)
            written.append(target)
    return written


def figures(tables: list[tuple[Table, Block]], names: dict[int, str]) -> list[tuple[str, object]]:
    """``(name, figure)``: few-shot curves per backbone (over all shots), base/novel/H
    bars per base-to-novel table, bars per table of any other protocol."""
    few_shot = [p for table, block in tables if table.kind == "few_shot" for p in block.pairs]
    out = [(f"few_shot-{_slug(backbone)}", few_shot_figure(block))
           for (backbone,), block in _blocks(few_shot, names, lambda p: (p.group.backbone,)).items()]
    for table, _ in tables:
        if table.kind not in ("few_shot", "cost"):
            out.append((table.name, base2novel_figure(table) if table.kind == "base2novel" else transfer_figure(table)))
    return out


# ------------------------------------------------------------------ the report


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


def published_numbers(registry) -> dict[str, tuple[Published, ...]]:
    """Every registered method's published results, by method name."""
    return {name: entry.published for name, entry in registry.entries["method"].items()}


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
