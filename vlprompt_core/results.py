"""Results: ``results.json`` (written atomically after every (method, seed)) and tables."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import math
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from .errors import os_error


@contextlib.contextmanager
def atomic_file(path: Path, sync: bool = False) -> Iterator[Path]:
    """``with atomic_file(path) as tmp:`` write ``tmp``, a new empty file beside
    ``path``; at the end it is renamed over ``path`` (with ``sync``, flushed to disk
    first): never half a file. On an error it is removed. It has the mode ``open()``
    gives a new file, 0666 less the umask, whatever wrote it (``tempfile.mkstemp`` and
    safetensors make 0600, which would keep others out of a shared results tree).
    What the file system refuses, safetensors' own error for it included, is an
    :class:`OSError` naming ``path`` (:func:`~vlprompt_core.errors.os_error`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(1000):
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{path.parent}: no free temporary name beside {path.name}")
    except OSError as exc:
        raise os_error(exc, path) from exc
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        os.chmod(tmp, mode)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        refused = os_error(exc, path)
        if refused is None:
            raise
        raise refused from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside ``path`` and rename it over: never half a file."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def package_versions(extra: list[str] = ()) -> dict[str, str]:
    out = {}
    for dist in ["vlprompt", "vlprompt-kernels", "torch", "torchvision", "open_clip_torch", *extra]:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and population std (as the reference ``parse_test_res.py`` reports)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {"mean": mean, "std": std, "n": n}


def aggregate(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method label: {metric: {mean, std, n}}}`` over seeds, metrics in protocol order."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r["summary"])
    return {
        label: {metric: mean_std([s[metric] for s in summaries]) for metric in summaries[0]}
        for label, summaries in by_method.items()
    }


#: Cost figures of a pair aggregated over seeds (``results.json`` ``cost``), by path in the pair's ``cost``.
COST_FIGURES = {
    "time_s": ("time_s", "total"),
    "peak_memory_mb": ("peak_memory_mb",),
    "train_images_per_s": ("train_images_per_s",),
    "eval_images_per_s": ("eval_images_per_s",),
    "trainable_parameters": ("trainable_parameters",),
}


def cost_figure(cost: dict | None, path: tuple[str, ...]) -> float | None:
    """The figure at ``path`` (see :data:`COST_FIGURES`) in a pair's ``cost``, or None."""
    value = cost
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def aggregate_cost(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method label: {figure: {mean, std, n}}}`` over the seeds that have the figure
    (pairs kept from results of an older vlprompt may have none)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == label]
        figures = {name: [v for r in mine if (v := cost_figure(r.get("cost"), path)) is not None]
                   for name, path in COST_FIGURES.items()}
        out[label] = {name: mean_std(values) for name, values in figures.items() if values}
    return out


#: Cost columns of the run table: (header, figure in ``cost``, format of its mean).
COST_COLUMNS = (("time / seed", "time_s", "{:.1f} s"), ("memory", "peak_memory_mb", "{:,.0f} MB"))


def _rows(summary: dict, cost: dict | None) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The run table's header and rows: accuracies (mean ± std over seeds) and, with
    ``cost``, each method's mean time per (method, seed) pair and peak memory."""
    metrics = list(next(iter(summary.values())).keys()) if summary else []
    header = metrics + ([h for h, _, _ in COST_COLUMNS] if cost is not None else [])
    rows = []
    for label, row in summary.items():
        cells = [_cell(row[m]) for m in metrics]
        if cost is not None:
            figures = cost.get(label, {})
            cells += [fmt.format(figures[f]["mean"]) if f in figures else "" for _, f, fmt in COST_COLUMNS]
        rows.append((label, cells))
    return header, rows


def markdown_table(summary: dict[str, dict[str, dict[str, float]]], title: str, cost: dict | None = None) -> str:
    """The same table as :func:`results_table`, as Markdown (``results.md``)."""
    header, rows = _rows(summary, cost)
    lines = [f"# {title}", "", "| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n"


def _cell(s: dict[str, float]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}" if s["n"] > 1 else f"{s['mean']:.2f}"


def results_table(summary: dict[str, dict[str, dict[str, float]]], title: str, cost: dict | None = None) -> Table:
    """Accuracy per method (and, with ``cost``, time per pair and peak memory)."""
    header, rows = _rows(summary, cost)
    table = Table(title=title)
    table.add_column("method", style="bold")
    for h in header:
        table.add_column(h, justify="right")
    for label, cells in rows:
        table.add_row(Text(label), *cells)  # Text: a label is never markup
    n = max((row[m]["n"] for row in summary.values() for m in row), default=0)
    table.caption = f"accuracy (%), mean ± std over {n} seed(s)" if n > 1 else "accuracy (%)"
    if cost is not None:
        table.caption += "; time and peak memory per seed"
    return table


#: The train settings shown per method before a run (all are stored in results.json).
SHOWN_SETTINGS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "precision")


def settings_table(methods) -> Table:
    """Each method's resolved settings; ``*`` marks values from the method's recipe."""
    table = Table(title="settings: spec > method recipe (*) > defaults", title_justify="left",
                  show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column("method", style="bold", no_wrap=True)
    table.add_column("settings")
    for m in methods:
        mark = lambda key: "*" if m.sources.get(key) == "recipe" else ""  # noqa: E731
        shown = SHOWN_SETTINGS + (("adam_eps",) if m.train.optimizer != "sgd" else ())
        train = ", ".join(f"{n} {getattr(m.train, n)}{mark('train.' + n)}" for n in shown)
        chosen = [k for k, v in m.sources.items() if not k.startswith("train.") and v != "default"]
        options = ", ".join(f"{k}={m.option(k)!r}{mark(k)}" for k in chosen) or "defaults"
        table.add_row(Text(m.label), Text(f"{train}; options: {options}"))  # Text: values are never markup
    return table
