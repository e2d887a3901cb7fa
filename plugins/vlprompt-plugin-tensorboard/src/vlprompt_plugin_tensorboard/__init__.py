"""TensorBoard logger for vlprompt: a worked example of a logger plug-in.

The plug-in registers one :class:`~vlprompt_core.api.LoggerEntry` (its name and
options) and does everything else in the lifecycle hooks. It is enabled for a run
by a section in the spec's ``loggers:`` list::

    loggers: [{name: tensorboard}]            # event files in <results folder>/tensorboard
    loggers: {name: tensorboard, log_dir: tb, flush_secs: 10}

and does nothing at all for a run whose spec does not name it. What it writes, per
(method, seed) pair, with ``P = <method label>/seed<seed>``:

* every epoch (step = epoch, 0-based): ``P/train/loss``, ``P/train/acc``,
  ``P/train/loss.<term>`` for each extra loss term, ``P/lr``, ``P/time_s``;
* when the pair is scored (step = the number of epochs it trained):
  ``P/accuracy/<evaluation set>``, ``P/summary/<metric>`` and, when the pair has cost
  figures, ``P/cost/<figure>`` (numbers only; nested figures joined by ``/``);
* when the run ends (step 0): ``<method label>/mean/<metric>`` and
  ``<method label>/std/<metric>`` over seeds, ``<method label>/cost/<figure>`` (mean),
  and the run table of ``results.md`` as text.

State is kept per results folder, so the runs of a sweep made one after another in
one process each get their own writer. The writer is flushed after every pair (a
crash loses at most ``flush_secs`` of the epochs of the pair in progress), closed at
the end of the run, and, when a failed run left it open, at the next start of a run
in the same folder or when the process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from vlprompt_core import hookimpl
from vlprompt_core.api import LoggerEntry, Options

NAME = "tensorboard"


class TensorBoardOptions(Options):
    """Options of a ``{name: tensorboard}`` section of ``loggers:``."""

    log_dir: str = Field(
        "tensorboard", min_length=1,
        description="folder of the event files, relative to the results folder (or absolute)")
    flush_secs: int = Field(
        30, ge=1, le=86_400,
        description="seconds between flushes of the epoch scalars to disk (each pair is also flushed when it ends)")


@hookimpl
def vlprompt_loggers() -> list[LoggerEntry]:
    return [LoggerEntry(NAME, TensorBoardOptions,
                        "TensorBoard event files: training curves, accuracies and summaries per method and seed")]


# ------------------------------------------------------------------------- state


@dataclass
class _Run:
    """The open writer of one run (one results folder)."""

    writer: Any  # torch.utils.tensorboard.SummaryWriter
    log_dir: Path


_runs: dict[str, _Run] = {}
_lock = threading.Lock()


def _key(output_dir: str) -> str:
    return os.path.abspath(output_dir)


def _sections(spec: dict[str, Any]) -> list[dict[str, Any]]:
    loggers = spec.get("loggers") or []
    if isinstance(loggers, dict):
        loggers = [loggers]
    return [s for s in loggers if isinstance(s, dict) and s.get("name") == NAME]


def _close(key: str) -> None:
    run = _runs.pop(key, None)
    if run is not None:
        run.writer.close()


@atexit.register
def _close_all() -> None:
    """Writers a failed run left open are flushed and closed when the process exits."""
    with _lock:
        for key in list(_runs):
            try:
                _close(key)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _flat_numbers(data: Any, prefix: str) -> dict[str, float]:
    """``{prefix/a/b: number}`` for every number in nested mappings (others skipped)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flat_numbers(value, f"{prefix}/{key}"))
    elif (number := _number(data)) is not None:
        out[prefix] = number
    return out


#: Epoch metrics with their own tag (after ``<method>/seed<seed>/``); ``epoch`` is the step.
EPOCH_TAGS = {"loss": "train/loss", "train_acc": "train/acc", "lr": "lr", "time_s": "time_s"}


def epoch_tag(metric: str) -> str | None:
    """The tag (after ``<method>/seed<seed>/``) of an epoch metric, or None for the step."""
    if metric == "epoch":
        return None
    if metric.startswith("loss."):
        return f"train/{metric}"
    return EPOCH_TAGS.get(metric, metric)


# ------------------------------------------------------------------------- hooks


@hookimpl
def vlprompt_run_start(spec: dict[str, Any], output_dir: str) -> None:
    key = _key(output_dir)
    with _lock:
        try:
            _close(key)  # left open by a failed run in the same folder
        except Exception:  # noqa: BLE001 - what it held is lost either way; the new run is logged
            pass
        sections = _sections(spec)
        if not sections:
            return
        options = TensorBoardOptions.model_validate({k: v for k, v in sections[0].items() if k != "name"})
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(output_dir) / options.log_dir
        writer = SummaryWriter(log_dir=str(log_dir), flush_secs=options.flush_secs)
        _runs[key] = _Run(writer, log_dir)
        writer.add_text("spec", "```json\n" + json.dumps(spec, indent=2, sort_keys=True) + "\n```", 0)
        writer.flush()


@hookimpl
def vlprompt_epoch_end(method: str, seed: int, epoch: int, metrics: dict[str, float], output_dir: str) -> None:
    with _lock:
        run = _runs.get(_key(output_dir))
        if run is None:
            return
        for metric, value in metrics.items():
            tag, number = epoch_tag(metric), _number(value)
            if tag is not None and number is not None:
                run.writer.add_scalar(f"{method}/seed{seed}/{tag}", number, epoch)


@hookimpl
def vlprompt_evaluation_done(method: str, seed: int, results: dict[str, Any], output_dir: str) -> None:
    with _lock:
        run = _runs.get(_key(output_dir))
        if run is None:
            return
        step = len(results.get("epochs") or [])
        prefix = f"{method}/seed{seed}"
        scalars = {
            **_flat_numbers(results.get("accuracy") or {}, f"{prefix}/accuracy"),
            **_flat_numbers(results.get("summary") or {}, f"{prefix}/summary"),
            **_flat_numbers(results.get("cost") or {}, f"{prefix}/cost"),
        }
        for tag, value in scalars.items():
            run.writer.add_scalar(tag, value, step)
        run.writer.flush()


@hookimpl
def vlprompt_run_end(results: dict[str, Any], output_dir: str) -> None:
    key = _key(output_dir)
    with _lock:
        run = _runs.get(key)
        if run is None:
            return
        try:
            for label, metrics in (results.get("summary") or {}).items():
                for metric, stats in metrics.items():
                    for stat in ("mean", "std"):
                        if isinstance(stats, dict) and (number := _number(stats.get(stat))) is not None:
                            run.writer.add_scalar(f"{label}/{stat}/{metric}", number, 0)
            for label, figures in (results.get("cost") or {}).items():
                for figure, stats in figures.items():
                    if isinstance(stats, dict) and (number := _number(stats.get("mean"))) is not None:
                        run.writer.add_scalar(f"{label}/cost/{figure}", number, 0)
            table = Path(output_dir) / "results.md"
            if table.is_file():
                run.writer.add_text("results", table.read_text(), 0)
        finally:
            _close(key)
