"""Downstream classification tasks drawn from the embedded world.

Classes are ``"<colour> <shape>"`` pairs over 6 colours x 5 shapes (30
classes).  Every pair occurs in the pre-training captions, but the model
never sees a classification task over them.  The canonical class order puts
a checkerboard half of the grid first (``(colour + shape) % 2 == 0``), so the
base half (first ``ceil(n/2)`` labels) and the novel half both mix every
colour and every shape, and base-to-novel generalisation must transfer to new
*combinations* rather than to new colours.

* ``objects``         -- photographed under warm light; nuisances (size,
                         position) vary freely; textures are plain or
                         striped; backgrounds dark, light or noisy.
* ``objects_shifted`` -- same classes under a domain shift: dotted or
                         checkered objects on grass, sky or sand, under cool
                         light.

The fixed lighting of a task is what leaves room for prompt learning: the
pre-training captions nearly always mention unusual lighting, so the default
prompt "a photo of a {}." describes neutral light and confuses colours that
the cast makes look alike (see :mod:`.world`).

:func:`write_task` stores a task in the split-file layout of the real
benchmarks (``images/`` plus ``split.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import world

TASK_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
TASK_SHAPES = ("circle", "square", "triangle", "star", "heart")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    """A downstream task: which nuisances are allowed and how many images."""

    description: str
    textures: tuple[str, ...]
    backgrounds: tuple[str, ...]
    lighting: str
    per_class: dict[str, int]  # split -> images per class


TASKS: dict[str, Task] = {
    "objects": Task(
        description="colour x shape, source domain",
        textures=("plain", "striped"),
        backgrounds=("dark", "light", "noisy"),
        lighting="warm",
        per_class={"train": 32, "val": 8, "test": 25},
    ),
    "objects_shifted": Task(
        description="colour x shape under a texture/background shift",
        textures=("dotted", "checkered"),
        backgrounds=("grass", "sky", "sand"),
        lighting="cool",
        per_class={"train": 4, "val": 2, "test": 25},
    ),
}


def _class_pairs() -> list[tuple[str, str]]:
    grid = [(c, s) for c in range(len(TASK_COLOURS)) for s in range(len(TASK_SHAPES))]
    ordered = [p for p in grid if sum(p) % 2 == 0] + [p for p in grid if sum(p) % 2 == 1]
    return [(TASK_COLOURS[c], TASK_SHAPES[s]) for c, s in ordered]


def classnames(task: str) -> list[str]:
    """The canonical class list of ``task`` (index = label)."""
    _get(task)
    return [f"{colour} {shape}" for colour, shape in _class_pairs()]


def _get(task: str) -> Task:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown embedded task {task!r}; known: {sorted(TASKS)}") from None


def generate(task: str, split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render one split in memory: ``(uint8 images NxHxWx3, int labels N)``.

    Images are ordered class by class; the result depends only on
    ``(task, split, seed)``.
    """
    spec = _get(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), SPLITS.index(split)])
    n = spec.per_class[split]
    images, labels = [], []
    for label, (colour, shape) in enumerate(_class_pairs()):
        batch, _, _ = world.sample(n, rng, colour=colour, shape=shape,
                                   texture=spec.textures, background=spec.backgrounds,
                                   lighting=spec.lighting)
        images.append(batch)
        labels += [label] * n
    return np.concatenate(images), np.array(labels, dtype=np.int64)


def write_task(task: str, dest: Path, seed: int = 0) -> None:
    """Write ``task`` to ``dest`` as ``images/<split>/<class>_<i>.png`` + ``split.json``.

    ``split.json`` maps each of train/val/test to a list of
    ``[path relative to images/, label, classname]``.  The dataset is built in
    a temporary folder beside ``dest`` and renamed into place, so ``dest``
    either does not exist or is complete.  Raises ``FileExistsError`` if
    ``dest`` already exists.
    """
    from PIL import Image

    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    names = classnames(task)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        split_index = {}
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            images, labels = generate(task, split, seed)
            entries = []
            for i, (image, label) in enumerate(zip(images, labels)):
                rel = f"{split}/{names[label].replace(' ', '_')}_{i:04d}.png"
                Image.fromarray(image).save(tmp / "images" / rel)
                entries.append([rel, int(label), names[label]])
            split_index[split] = entries
        (tmp / "split.json").write_text(json.dumps(split_index))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
