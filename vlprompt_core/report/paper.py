"""``--paper``: the numbers methods declare as published, matched to a table's cells by
(method name, protocol, dataset, shots, backbone)."""

from __future__ import annotations

from ..api import Published
from .collect import Group


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


def published_numbers(registry) -> dict[str, tuple[Published, ...]]:
    """Every registered method's published results, by method name."""
    return {name: entry.published for name, entry in registry.entries["method"].items()}
