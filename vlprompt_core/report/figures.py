"""The figures of a report (matplotlib): few-shot curves, base/novel/H bars, bars for any
other protocol; saved the same way for the same results."""

from __future__ import annotations

import math
from pathlib import Path

from ..results import mean_std
from .tables import Block, Table, _blocks, _slug

FORMATS = ("png", "svg")
PANEL_IN = (4.0, 3.5)  # one figure panel, inches
DPI = 100
MAX_PANEL_COLUMNS = 4


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
