"""Loading images: on-disk layouts, few-shot sampling and the reference transforms."""

from __future__ import annotations

import csv
import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image, UnidentifiedImageError

from .api import ClassSet, DatasetSplits, Item
from .errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def default_data_root() -> Path:
    """``$VLPROMPT_DATA``, else ``~/.cache/vlprompt/data``."""
    return Path(os.environ.get("VLPROMPT_DATA", Path.home() / ".cache" / "vlprompt" / "data")).expanduser()


def prompt_name(classname: str) -> str:
    """How a class name is written into a prompt (``apple_pie`` -> ``apple pie``)."""
    return classname.replace("_", " ")


# ------------------------------------------------------------------- layouts


def load_split_file(
    name: str, split_file: Path, image_dir: Path, classes: ClassSet
) -> DatasetSplits:
    """The benchmark layout: a JSON with ``train``/``val``/``test`` lists of
    ``[relative image path, label, class name]``, paths relative to ``image_dir``."""
    try:
        data = json.loads(split_file.read_text())
    except FileNotFoundError:
        raise UserError(f"{split_file}: split file not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{split_file}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    splits: dict[str, list[Item]] = {}
    for split in ("train", "val", "test"):
        rows = data.get(split)
        if not isinstance(rows, list):
            raise UserError(f"{split_file}: missing list {split!r}")
        items = []
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[1], int)):
                raise UserError(f"{split_file}: {split}[{i}] is not [path, label, classname]")
            if not 0 <= row[1] < len(classes):
                raise UserError(f"{split_file}: {split}[{i}] label {row[1]} outside 0..{len(classes) - 1}")
            expected = classes.names[row[1]]
            if prompt_name(row[2]).lower() != prompt_name(expected).lower():
                raise UserError(
                    f"{split_file}: {split}[{i}] calls label {row[1]} {row[2]!r}, the dataset spec {expected!r}"
                )
            items.append(Item(image_dir / row[0], row[1]))
        splits[split] = items
    return DatasetSplits(name, classes, splits["train"], splits["val"], splits["test"])


def _class_folder_items(folder: Path, class_dirs: list[str]) -> list[Item]:
    """Images under ``folder/<class>/``, labelled by the class's index (missing folders: none)."""
    items = []
    for label, cls in enumerate(class_dirs):
        if not (folder / cls).is_dir():
            continue
        for f in sorted((folder / cls).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(f, label))
    return items


def load_imagenet_layout(name: str, root: Path, classes: ClassSet) -> DatasetSplits:
    """ImageNet: ``images/train/<wnid>/`` and ``images/val/<wnid>/``; labels follow
    the sorted wnid folders, val serves as test (as in the reference code)."""
    splits = {}
    for split in ("train", "val"):
        folder = root / "images" / split
        if not folder.is_dir():
            raise UserError(f"{folder}: folder not found (expected images/{split}/<wnid>/...)")
        wnids = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if len(wnids) != len(classes):
            raise UserError(
                f"{folder}: {len(wnids)} class folders, expected {len(classes)} "
                "(val/ must be sorted into class folders)"
            )
        splits[split] = _class_folder_items(folder, wnids)
    return DatasetSplits(name, classes, splits["train"], [], splits["val"])


def split_per_class(items: list[Item], fractions: tuple[float, float, float], seed: int = 0):
    """Deterministic per-class train/val/test split of ``items``."""
    by_label: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        by_label[it.label].append(it)
    rng = random.Random(seed)
    out: tuple[list[Item], list[Item], list[Item]] = ([], [], [])
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda it: str(it.path))
        rng.shuffle(group)
        n_train = round(len(group) * fractions[0])
        n_val = round(len(group) * fractions[1])
        out[0].extend(group[:n_train])
        out[1].extend(group[n_train : n_train + n_val])
        out[2].extend(group[n_train + n_val :])
    return out


def load_class_folders(name: str, root: Path, templates: list[str], fractions=(0.5, 0.2, 0.3)) -> DatasetSplits:
    """A user's folder: ``root/<class>/*.jpg`` (split per class, seeded) or
    ``root/{train,val,test}/<class>/*.jpg``. Class names are the sorted folder names."""
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    if (root / "train").is_dir() and (root / "test").is_dir():
        class_dirs = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        splits = {}
        for split in ("train", "val", "test"):
            folder = root / split
            if not folder.is_dir():
                splits[split] = []
                continue
            unknown = sorted({d.name for d in folder.iterdir() if d.is_dir()} - set(class_dirs))
            if unknown:
                raise UserError(f"{folder}: class folders not in train/: {', '.join(unknown)}")
            splits[split] = _class_folder_items(folder, class_dirs)
        train, val, test = splits["train"], splits["val"], splits["test"]
    else:
        class_dirs = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not class_dirs:
            raise UserError(f"{root}: no class subfolders")
        train, val, test = split_per_class(_class_folder_items(root, class_dirs), fractions)
    return DatasetSplits(name, ClassSet([prompt_name(c) for c in class_dirs], templates), train, val, test)


def load_csv(name: str, path: Path, image_root: Path | None, templates: list[str]) -> DatasetSplits:
    """A CSV with columns ``path``, ``class`` and ``split`` (train/val/test); class
    names are sorted, paths relative to ``image_root`` (default: the CSV's folder)."""
    if not path.is_file():
        raise UserError(f"{path}: CSV file not found")
    base = image_root or path.parent
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "class", "split"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        rows = list(reader)
    names = sorted({r["class"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for i, r in enumerate(rows, start=2):
        if r["split"] not in splits:
            raise UserError(f"{path}:{i}: split {r['split']!r} is not train, val or test")
        splits[r["split"]].append(Item(base / r["path"], index[r["class"]]))
    return DatasetSplits(name, ClassSet([prompt_name(n) for n in names], templates), **splits)


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


# ----------------------------------------------------------------- transforms


def train_transform(size: int, mean, std, scale: tuple[float, float] = (0.08, 1.0)):
    """Reference train transform: random resized crop (scale 0.08-1, bicubic) + flip."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def test_transform(size: int, mean, std):
    """Reference test transform: resize the shorter side (bicubic) + centre crop."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class ImageDataset(torch.utils.data.Dataset):
    """``(image tensor, label)`` pairs read from disk."""

    def __init__(self, items: list[Item], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            with Image.open(item.path) as im:
                img = im.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"{item.path}: image file not found") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{item.path}: cannot read image ({exc})") from None
        return self.transform(img), item.label
