"""Few-shot sampling: K training images per class, drawn without replacement and
deterministic in a key naming the dataset, K and the seed, so that every method of
a run (and every run with the same seed) trains on the same images."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterable

from ..api import Item


# ------------------------------------------------------------------- few-shot


def sample_few_shot(items: Iterable[Item], shots: int, key: str) -> list[Item]:
    """``shots`` items per class without replacement (all of them if a class has
    fewer), deterministic in ``key`` (e.g. ``"pets:16:1"`` for dataset, K, seed)."""
    by_label: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        by_label[it.label].append(it)
    rng = random.Random(key)
    chosen: list[Item] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda it: str(it.path))
        chosen.extend(group if len(group) <= shots else rng.sample(group, shots))
    return chosen
