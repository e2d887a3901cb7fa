"""Using what a run trained, outside a run: :func:`load` makes a
:class:`~.classifier.Classifier` of a (method, seed) pair from its results folder or
from a file :func:`export` wrote; ``vlprompt predict`` and ``vlprompt export`` are
these on the command line.

* :mod:`.classifier` — :class:`Classifier` (predict, text features, other classes,
  devices) and the :class:`Predictions` it returns;
* :mod:`.load` — rebuilding the pair as the run built it (its spec, classes and
  checkpoint, checked as ``vlprompt eval --from`` checks it), or from an export;
* :mod:`.exported` — the export file (one safetensors file, checksummed, with the
  backbone's weights hash) and its model card.
"""

from __future__ import annotations

from pathlib import Path

from ..plugins import Registry
from .classifier import Classifier, ImageInput, Predictions, static_text_features
from .exported import FORMAT, read_export, write_export
from .load import load

__all__ = ["Classifier", "Predictions", "ImageInput", "load", "export", "FORMAT", "read_export",
           "static_text_features"]


def export(source: str | Path, out: str | Path, method: str | None = None, seed: int | None = None,
           registry: Registry | None = None) -> tuple[Path, Path]:
    """Write the classifier :func:`load` makes of ``source`` (a results folder, or an
    export) to ``out``, one safetensors file, with its model card beside it (``out``
    with ``.md``); returns both paths."""
    return write_export(load(source, method, seed, registry=registry), Path(out).expanduser())
