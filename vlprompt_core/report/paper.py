"""``--paper``: the numbers methods declare as published, matched to a table's cells by
(method name, protocol, dataset, shots, backbone); a paper's average over datasets
(:meth:`Published.average`) to a table's average cells when the table's datasets are
those it averages."""

from __future__ import annotations

from ..api import Published
from .collect import Group


class PaperNumbers:
    """Published numbers by (method name, protocol, dataset, shots, backbone)."""

    def __init__(self, entries: dict[str, tuple[Published, ...]] | None):
        found = [(name, p) for name, ps in (entries or {}).items() for p in ps]
        self.index = {(name, p.protocol, p.dataset, p.shots, _same(p.backbone)): p.metrics
                      for name, p in found if not p.over}
        self.averages = {(name, p.protocol, p.over, p.shots, _same(p.backbone)): p.metrics
                         for name, p in found if p.over}

    def get(self, name: str, group: Group, dataset: str, metric: str) -> float | None:
        found = self.index.get((name, group.protocol, dataset, group.shots, _same(group.backbone)), {})
        return found.get(metric)

    def average(self, name: str, group: Group, datasets, metric: str) -> float | None:
        """The published average of ``metric`` over exactly ``datasets`` (in any order)."""
        over = tuple(sorted(set(datasets)))
        return self.averages.get((name, group.protocol, over, group.shots, _same(group.backbone)), {}).get(metric)


def _same(backbone: str) -> str:
    """``ViT-B/16`` (the papers) and ``ViT-B-16`` (open_clip) name the same model."""
    return backbone.replace("/", "-").lower()


def published_numbers(registry) -> dict[str, tuple[Published, ...]]:
    """Every registered method's published results, by method name."""
    return {name: entry.published for name, entry in registry.entries["method"].items()}
