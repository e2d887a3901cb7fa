"""Miniature fake copies of the benchmarks, for tests that need no downloads.

:func:`write_fake_dataset` lays out a handful of tiny images per class exactly as a
dataset's spec file expects them (split file, ImageNet folders, class folders or
FGVC-Aircraft's split lists), with the spec's class names. Every image of a class
is one solid colour, :func:`class_colour` of its class name (the name as prompted),
so a test can tell from the pixels which class an image belongs to, whatever
dataset and label it sits under.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from ..data import SPLITS, prompt_name


def builtin_specs() -> dict:
    """The dataset spec files vlprompt reads (built-ins and ``$VLPROMPT_DATASETS_SPEC``), by name."""
    from ..builtin.spec_datasets import read_spec_files

    entries, problems = read_spec_files()
    if problems:
        raise AssertionError(f"dataset spec files with problems: {problems}")
    return {e.name: e.options.spec for e in entries}


def class_colour(name: str) -> tuple[int, int, int]:
    """The colour of every fake image of the class called ``name`` (as prompted)."""
    digest = hashlib.sha256(prompt_name(name).encode()).digest()
    return digest[0], digest[1], digest[2]


def _image(path: Path, colour, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def layout_splits(spec) -> tuple[str, ...]:
    """The splits a layout stores separately (class folders without split folders
    are split by the loader, so their images are written once)."""
    if spec.layout == "imagenet":
        return ("train", "test")
    if spec.layout == "class_folders":
        return ("test",) if spec.test_only else ("all",)
    return SPLITS


def write_fake_dataset(spec, root: Path, per_class: int = 1, size: int = 16, classes: list[int] | None = None) -> Path:
    """A miniature copy of ``spec``'s layout under ``root/<spec.folder>``: ``per_class``
    images of every class (or of the labels in ``classes``) in every split the layout
    has. Returns the dataset folder."""
    folder = Path(root) / spec.folder
    image_dir = folder if spec.image_dir == "." else folder / spec.image_dir
    labels = range(len(spec.classnames)) if classes is None else classes
    dirs = spec.class_dir_list()
    ext = spec.image_suffix or ".png"
    rows: dict[str, list] = {s: [] for s in SPLITS}
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for label in labels:
        cname = spec.classnames[label]
        colour = class_colour(cname)
        for split in layout_splits(spec):
            for i in range(per_class):
                stem = f"{split}_{label:04d}_{i}"
                if spec.layout == "split_file":
                    rel = f"c{label:04d}/{stem}{ext}"
                    _image(image_dir / rel, colour, size)
                    rows[split].append([rel, label, cname])
                elif spec.layout == "image_lists":
                    _image(image_dir / f"{stem}{ext}", colour, size)
                    lines[split].append(f"{stem} {cname}")
                elif spec.layout == "imagenet":
                    sub = "train" if split == "train" else "val"
                    _image(image_dir / sub / dirs[label] / f"{stem}.png", colour, size)
                else:
                    _image(image_dir / (dirs[label] if dirs else cname) / f"{stem}{ext}", colour, size)
    if spec.layout == "split_file":
        (folder / spec.split_file).write_text(json.dumps(rows))
    elif spec.layout == "image_lists":
        for split, fname in spec.split_lists.items():
            (folder / fname).write_text("".join(f"{line}\n" for line in lines[split]))
    return folder
