"""The data a plug-in sees and returns: labelled images, class sets, loaded datasets,
evaluation sets and a protocol's per-seed :class:`Plan`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Item:
    """One labelled image on disk."""

    path: Path
    label: int


@dataclass(frozen=True)
class ClassSet:
    """The classes a classifier is built for: canonical names and prompt templates.

    ``templates`` are the dataset's own hand-written prompt(s), the first one being
    *the* zero-shot prompt; ``ensemble`` is the prompt ensemble the literature uses
    for this dataset (``None``: the dataset's templates plus
    :data:`~vlprompt_core.prompting.ENSEMBLE_TEMPLATES`); see
    :func:`~vlprompt_core.prompting.templates_for`.
    """

    names: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    ensemble: list[str] | None = None

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class DatasetSplits:
    """A loaded dataset: canonical classes (index = label) and its splits."""

    name: str
    classes: ClassSet
    train: list[Item]
    val: list[Item]
    test: list[Item]


@dataclass
class EvalSet:
    """A split scored under its own classifier (e.g. the novel classes only)."""

    name: str
    items: list[Item]
    classes: ClassSet


@dataclass
class Plan:
    """What a protocol decided for one seed: what trains and what is scored."""

    train: list[Item]
    val: list[Item]
    classes: ClassSet
    evals: list[EvalSet]
    #: The few-shot items drawn for this seed, JSON-able; saved as ``fewshot/seed<N>.json``.
    sample: dict[str, Any] = field(default_factory=dict)
