"""The hooks a vlprompt plug-in can implement.

A plug-in is a module (found through the ``vlprompt`` entry-point group, or one of
the built-ins) with functions decorated by :data:`vlprompt_core.hookimpl` and named
like the specs below. The four *registration* hooks return lists of named factories
(:mod:`vlprompt_core.api`); the core keys them by name and never imports a backbone,
method, dataset or protocol itself. The *lifecycle* hooks are for loggers and
exporters; their return values are ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .api import BackbonePlugin, DatasetPlugin, MethodPlugin, ProtocolPlugin

hookspec = pluggy.HookspecMarker("vlprompt")


@hookspec
def vlprompt_backbones() -> list[BackbonePlugin]:
    """Vision-language backbones this plug-in can build (e.g. ``open_clip``)."""


@hookspec
def vlprompt_methods() -> list[MethodPlugin]:
    """Prompt-learning methods (e.g. ``coop``), each with its options model."""


@hookspec
def vlprompt_datasets() -> list[DatasetPlugin]:
    """Datasets: canonical class names, templates and train/val/test items."""


@hookspec
def vlprompt_protocols() -> list[ProtocolPlugin]:
    """Evaluation protocols (few-shot, base-to-novel, ...): what trains, what is scored."""


@hookspec
def vlprompt_run_start(spec: dict[str, Any], output_dir: str) -> None:
    """A run begins; ``spec`` is the resolved run spec as plain data."""


@hookspec
def vlprompt_epoch_end(method: str, seed: int, epoch: int, metrics: dict[str, float]) -> None:
    """One training epoch ended (``metrics`` holds at least ``loss`` and ``lr``)."""


@hookspec
def vlprompt_evaluation_done(method: str, seed: int, results: dict[str, Any]) -> None:
    """A (method, seed) pair was trained and scored; ``results`` is what is stored."""
