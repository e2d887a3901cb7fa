"""The tables of a report: cells (mean ± std over seeds), one table per protocol (few-shot
and base-to-novel per backbone and shots, any other protocol per group), each followed
by what it cost (:func:`build_tables`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..builtin.protocols import harmonic_mean
from ..results import COST_FIGURES, cost_figure, mean_std
from .collect import Group, Pair
from .paper import PaperNumbers


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
        average = None
        if all(cells):
            published = _published_average(block, row, groups, paper, "accuracy")
            average = Cell(sum(c.mean for c in cells) / len(cells), published=published)
        rows[row] = [*cells, average]
    return Table("few_shot", f"few_shot-{_slug(backbone)}-{shots}shots", f"{shots}-shot accuracy ({backbone})",
                 [g.dataset for g in groups] + ["average"], rows,
                 "average: mean over datasets of the per-dataset means (blank unless the method ran on all)")


def _published_average(block: Block, row: str, groups: list[Group], paper: PaperNumbers, metric: str) -> float | None:
    """A row's published average of ``metric`` over the table's datasets, when its paper
    declares one over exactly those (:meth:`PaperNumbers.average`)."""
    first = next(p for g in groups for p in block.of(row, g))
    return paper.average(first.name, first.group, [g.dataset for g in groups], metric)


def base2novel_table(block: Block, backbone: str, shots: int, paper: PaperNumbers) -> Table:
    """Base, novel and H per dataset; the average row as in CoCoOp's Table 1: average
    base, average novel, and H of those two averages."""
    groups = block.groups()
    metrics = ("base", "novel", "H")
    rows = {}
    for row in block.rows():
        cells = [_metric_cell(block.of(row, g), m, paper, g.dataset) for g in groups for m in metrics]
        averages = _base2novel_average(cells[0::3], cells[1::3])
        for cell, metric in zip(averages, metrics):
            if cell is not None:
                cell.published = _published_average(block, row, groups, paper, metric)
        rows[row] = cells + averages
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
