"""Loading images: on-disk layouts, few-shot sampling and the reference transforms."""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .api import ClassSet, DatasetSplits, Item
from .errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def default_data_root() -> Path:
    """``$VLPROMPT_DATA``, else ``~/.cache/vlprompt/data``."""
    return Path(os.environ.get("VLPROMPT_DATA", Path.home() / ".cache" / "vlprompt" / "data")).expanduser()


def expand_user(path: Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; unchanged when that home
    folder is unknown (the path is then simply not found, with its name as written)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def prompt_name(classname: str) -> str:
    """How a class name is written into a prompt (``apple_pie`` -> ``apple pie``)."""
    return classname.replace("_", " ")


# ------------------------------------------------------------------- layouts
#
# Each layout has a scanner that returns what it could read *and* every problem it
# found (one line each, saying what is wrong and how to fix it): the loaders raise
# the problems as one UserError, ``vlprompt data check`` / ``validate`` report them.

SPLITS = ("train", "val", "test")

#: Problems of one kind shown before "... and N more".
SHOWN = 3


def _first(values: list, n: int = SHOWN) -> str:
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


@dataclass
class Scan:
    """What a layout scanner read: items per split, and problems (one line each)."""

    splits: dict[str, list[Item]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    problems: list[str] = field(default_factory=list)

    def raise_problems(self) -> None:
        if self.problems:
            raise UserError(*self.problems)


def _same_class(a: str, b: str) -> bool:
    return prompt_name(a).lower() == prompt_name(b).lower()


def inside(root: Path, path: str) -> bool:
    """Whether ``root / path`` stays in ``root``: not absolute elsewhere, no ``..``
    climbing out. Compared as written, links not followed (an image folder may
    legitimately be a link to another disk)."""
    base = os.path.abspath(root)
    return os.path.commonpath([base, os.path.abspath(os.path.join(base, path))]) == base


def read_split_json(split_file: Path) -> tuple[dict | None, list[str]]:
    """The parsed split file, or the problem that stops it being read."""
    try:
        data = json.loads(split_file.read_text())
    except FileNotFoundError:
        return None, [f"{split_file}: split file not found"]
    except UnicodeDecodeError:
        return None, [f"{split_file}: not valid JSON (not a text file)"]
    except json.JSONDecodeError as exc:
        return None, [f"{split_file}: not valid JSON ({exc.msg}, line {exc.lineno}); the file is truncated or "
                      "not a split file: download it again"]
    if not isinstance(data, dict):
        return None, [f"{split_file}: not a split file (expected an object with train/val/test lists)"]
    missing = [k for k in SPLITS if not isinstance(data.get(k), list)]
    if missing:
        return None, [f"{split_file}: missing list {k!r} (a split file holds train, val and test lists "
                      "of [image path, label, class name])" for k in missing]
    return data, []


def scan_split_file(split_file: Path, image_dir: Path, classes: ClassSet) -> Scan:
    """The benchmark layout: a JSON with ``train``/``val``/``test`` lists of
    ``[relative image path, label, class name]``, paths relative to ``image_dir``.
    Every row's label and class name are checked against the canonical ``classes``,
    and its path must stay in ``image_dir`` (a split file names images, not any file)."""
    scan = Scan()
    data, scan.problems = read_split_json(split_file)
    if data is None:
        return scan
    n = len(classes)
    index: dict[str, list[int]] = defaultdict(list)
    for label, cname in enumerate(classes.names):
        index[prompt_name(cname).lower()].append(label)
    bad_rows, outside, out_of_range, unknown, moved = [], [], [], [], []
    for split in SPLITS:
        for i, row in enumerate(data[split]):
            where = f"{split}[{i}]"
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                    and isinstance(row[1], int) and not isinstance(row[1], bool) and isinstance(row[2], str)):
                bad_rows.append(where)
                continue
            path, label, cname = row
            if not inside(image_dir, path):
                outside.append((where, path))
                continue
            if not 0 <= label < n:
                out_of_range.append((where, label, cname))
                continue
            if not _same_class(cname, classes.names[label]):
                others = index.get(prompt_name(cname).lower())
                (moved if others else unknown).append((where, label, cname, others))
                continue
            scan.splits[split].append(Item(image_dir / path, label))
    if bad_rows:
        scan.problems.append(f"{split_file}: {_first(bad_rows)} is not [path, label, classname]")
    if outside:
        where, path = outside[0]
        more = f" ({len(outside)} rows in all)" if len(outside) > 1 else ""
        scan.problems.append(f"{split_file}: {where}: image path {path!r} leads out of the image folder "
                             f"{image_dir}{more}; split-file paths are relative to it, without '..'")
    if out_of_range:
        where, label, cname = out_of_range[0]
        more = f" ({len(out_of_range)} rows in all)" if len(out_of_range) > 1 else ""
        scan.problems.append(f"{split_file}: {where} label {label} outside 0..{n - 1} ({cname!r}){more}: "
                             f"the dataset spec has {n} classes; is this the split file of another dataset?")
    if unknown:
        names = sorted({u[2] for u in unknown})
        where = unknown[0][0]
        rows = "1 row names such a class" if len(unknown) == 1 else f"{len(unknown)} rows name such classes"
        scan.problems.append(
            f"{split_file}: {where} names class {unknown[0][2]!r}, which the dataset spec does not have "
            f"({rows}: {_first(names)}); use the split file made for this dataset, or fix the spec's classnames"
        )
    if moved:
        where, label, cname, others = moved[0]
        more = f" ({len(moved)} rows in all)" if len(moved) > 1 else ""
        scan.problems.append(
            f"{split_file}: {where} calls label {label} {cname!r}, the dataset spec {classes.names[label]!r} "
            f"(the spec has {cname!r} at label {others[0]}){more}: the split file's labels do not follow the "
            "spec's class order"
        )
    return scan


def load_split_file(name: str, split_file: Path, image_dir: Path, classes: ClassSet) -> DatasetSplits:
    """Load the split-file layout (see :func:`scan_split_file`); any problem is a UserError."""
    scan = scan_split_file(split_file, image_dir, classes)
    scan.raise_problems()
    return DatasetSplits(name, classes, scan.splits["train"], scan.splits["val"], scan.splits["test"])


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


@dataclass
class FolderScan:
    """The class folders found in one folder: items by label, and what does not fit."""

    items: list[Item]
    found: set[str]
    extra: list[str]
    loose: list[Path]


def scan_class_dirs(folder: Path, class_dirs: list[str], list_images: bool = True) -> FolderScan:
    """Images under ``folder/<class_dirs[label]>/``; sub-folders the list does not
    have (``extra``) and images lying directly in ``folder`` (``loose``) are reported.
    ``list_images=False`` only looks at the folder itself (cheap)."""
    known = {d: label for label, d in enumerate(class_dirs)}
    items, found, extra, loose = [], set(), [], []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if entry.name not in known:
                extra.append(entry.name)
                continue
            found.add(entry.name)
            if list_images:
                items += [Item(f, known[entry.name]) for f in _images_in(entry)]
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            loose.append(entry)
    items.sort(key=lambda it: (it.label, str(it.path)))
    return FolderScan(items, found, extra, loose)


def class_folder_problems(folder: Path, scan: FolderScan, class_dirs: list[str], names: list[str],
                          require_all: bool = True, loose_fix: str = "") -> list[str]:
    """One line per way ``folder`` disagrees with the class list."""
    problems = []
    if scan.loose:
        fix = loose_fix or "move each image into the folder of its class"
        problems.append(f"{folder}: {len(scan.loose)} images lie directly in the folder, not in class folders "
                        f"({_first([p.name for p in scan.loose])}); {fix}")
    if scan.extra:
        problems.append(f"{folder}: {len(scan.extra)} class folder(s) the dataset's class list does not have: "
                        f"{_first(scan.extra)}; remove or rename them (the class list has {len(class_dirs)} classes)")
    missing = [i for i, d in enumerate(class_dirs) if d not in scan.found]
    if require_all and missing:
        show = [class_dirs[i] if class_dirs[i] == names[i] else f"{class_dirs[i]} ({names[i]})" for i in missing]
        problems.append(f"{folder}: {len(class_dirs) - len(missing)} class folders, the dataset has "
                        f"{len(class_dirs)}: missing {_first(show)}")
    return problems


def match_class_dirs(dirs: list[str], names: list[str], where: Path) -> list[str]:
    """The folder of each class in ``names``: the folder of the same name (``_`` and
    spaces alike, case kept). Folders and names that do not pair up are an error."""
    by_name = {prompt_name(d): d for d in dirs}
    class_dirs, missing = [], []
    for n in names:
        d = n if n in dirs else by_name.get(prompt_name(n))
        if d is None:
            missing.append(n)
        class_dirs.append(d or n)
    extra = sorted(set(dirs) - set(class_dirs))
    problems = []
    if extra:
        problems.append(f"{where}: class folder(s) not in the class list: {_first(extra)} (the class list has "
                        f"{len(names)} classes; add them to it, or remove the folders)")
    if missing:
        problems.append(f"{where}: no folder for class(es) {_first(missing)} of the class list")
    if problems:
        raise UserError(*problems)
    return class_dirs


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


def has_split_dirs(root: Path) -> bool:
    """``root/train/`` and ``root/test/`` exist: the class folders are split already."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def scan_class_folders(root: Path, classes: ClassSet, class_dirs: list[str], test_only: bool = False,
                       fractions=(0.5, 0.2, 0.3), list_images: bool = True) -> Scan:
    """Class folders with a known class list: ``root/<class_dirs[label]>/`` (all test
    images if ``test_only``, else split per class, seeded) or
    ``root/{train,val,test}/<class_dirs[label]>/``."""
    scan = Scan()
    if not root.is_dir():
        scan.problems.append(f"{root}: image folder not found")
        return scan
    if not test_only and has_split_dirs(root):
        found: set[str] = set()
        for split in SPLITS:
            if not (root / split).is_dir():
                continue
            fs = scan_class_dirs(root / split, class_dirs, list_images)
            scan.problems += class_folder_problems(root / split, fs, class_dirs, classes.names, require_all=False)
            scan.splits[split] = fs.items
            found |= fs.found
        missing = [class_dirs[i] for i in range(len(class_dirs)) if class_dirs[i] not in found]
        if missing:
            scan.problems.append(f"{root}: no folder for class(es) {_first(missing)} in train/, val/ or test/")
        return scan
    fs = scan_class_dirs(root, class_dirs, list_images)
    scan.problems += class_folder_problems(root, fs, class_dirs, classes.names)
    if test_only:
        scan.splits["test"] = fs.items
    else:
        scan.splits["train"], scan.splits["val"], scan.splits["test"] = split_per_class(fs.items, fractions)
    return scan


def _folder_dirs(root: Path, test_only: bool = False) -> tuple[list[str], list[str]]:
    """Class folder names of ``root``: those of ``train/`` and those only in val/ or test/
    (split layout), or those of ``root`` itself."""
    if test_only or not has_split_dirs(root):
        return sorted(d.name for d in root.iterdir() if d.is_dir()), []
    train = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    others = set()
    for s in ("val", "test"):
        if (root / s).is_dir():
            others |= {d.name for d in (root / s).iterdir() if d.is_dir()}
    return train, sorted(others - set(train))


def folder_class_dirs(root: Path, classnames: list[str] | dict[str, str], test_only: bool = False) -> list[str]:
    """The folder of each class of a given class list (a list of names, matched to the
    folder of the same name; or a mapping ``{folder: name}``); disagreement is an error."""
    train, only_eval = _folder_dirs(root, test_only)
    dirs = train + only_eval
    if isinstance(classnames, dict):
        class_dirs = [str(k) for k in classnames]
        extra = sorted(set(dirs) - set(class_dirs))
        missing = [d for d in class_dirs if d not in dirs]
        problems = []
        if extra:
            problems.append(f"{root}: class folder(s) the classnames mapping does not have: {_first(extra)}")
        if missing:
            problems.append(f"{root}: no folder for class(es) {_first(missing)} of the classnames mapping")
        if problems:
            raise UserError(*problems)
        return class_dirs
    return match_class_dirs(dirs, list(classnames), root)


def load_class_folders(
    name: str,
    root: Path,
    templates: list[str],
    fractions=(0.5, 0.2, 0.3),
    *,
    classnames: list[str] | dict[str, str] | None = None,
    ensemble: list[str] | None = None,
    test_only: bool = False,
) -> DatasetSplits:
    """A user's folder: ``root/<class>/*.jpg`` (split per class, seeded, 50/20/30 by
    default; all test images if ``test_only``) or ``root/{train,val,test}/<class>/*.jpg``.

    Classes: ``classnames`` as a list (label order; each needs a folder of the same
    name, ``_`` and spaces alike), as a mapping ``{folder: class name}`` (label order
    = mapping order), or by default the sorted folder names."""
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    if classnames is None:
        train, only_eval = _folder_dirs(root, test_only)
        if only_eval:
            raise UserError(f"{root}: class folders not in train/: {', '.join(only_eval)}")
        if not train:
            raise UserError(f"{root}: no class subfolders (expected {root}/<class>/*.jpg, or train/ and test/ "
                            "holding class folders)")
        class_dirs, names = train, train
    else:
        class_dirs = folder_class_dirs(root, classnames, test_only)
        names = list(classnames.values()) if isinstance(classnames, dict) else list(classnames)
    classes = ClassSet([prompt_name(str(n)) for n in names], list(templates), ensemble)
    scan = scan_class_folders(root, classes, class_dirs, test_only=test_only, fractions=fractions)
    scan.raise_problems()
    return DatasetSplits(name, classes, scan.splits["train"], scan.splits["val"], scan.splits["test"])


def scan_image_lists(folder: Path, image_dir: Path, lists: dict[str, str], suffix: str,
                     classes: ClassSet) -> Scan:
    """One text file per split, a ``<image id> <class name>`` line per image (the
    image is ``image_dir/<image id><suffix>``), as FGVC-Aircraft's official lists."""
    scan = Scan()
    index = {prompt_name(c): label for label, c in enumerate(classes.names)}
    for split, fname in lists.items():
        path = folder / fname
        if not path.is_file():
            scan.problems.append(f"{path}: split list not found")
            continue
        unknown, outside = [], []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            image_id, _, cname = line.strip().partition(" ")
            label = index.get(prompt_name(cname))
            if label is None:
                unknown.append(f"line {i} {cname!r}")
                continue
            if not inside(image_dir, f"{image_id}{suffix}"):
                outside.append(f"line {i} {image_id!r}")
                continue
            scan.splits[split].append(Item(image_dir / f"{image_id}{suffix}", label))
        if outside:
            scan.problems.append(f"{path}: image id(s) leading out of the image folder {image_dir}: "
                                 f"{_first(outside)}; ids name images in it, without '..'")
        if unknown:
            lines = "1 line names" if len(unknown) == 1 else f"{len(unknown)} lines name"
            scan.problems.append(f"{path}: {lines} a class the dataset spec does not have: {_first(unknown)} "
                                 "(expected '<image id> <class name>' lines)")
    return scan


# ----------------------------------------------------------- lists of images


def _classes_from_rows(rows: list[tuple[str, str, str | None]], classnames, templates, ensemble, where: Path):
    """Class list of (path, class, split) rows: ``classnames`` (list, label order;
    every class a row names must be in it) or the sorted class values."""
    values = sorted({r[1] for r in rows})
    if classnames is None:
        names, index = values, {v: i for i, v in enumerate(values)}
    else:
        if isinstance(classnames, dict):
            keys, names = [str(k) for k in classnames], [str(v) for v in classnames.values()]
        else:
            keys = names = list(classnames)
        index = {}
        for i, k in enumerate(keys):
            index.setdefault(k, i)
            index.setdefault(prompt_name(k), i)
        unknown = [v for v in values if v not in index and prompt_name(v) not in index]
        if unknown:
            raise UserError(f"{where}: class(es) not in the class list: {_first(unknown)} (the class list has "
                            f"{len(names)} classes)")
    classes = ClassSet([prompt_name(n) for n in names], list(templates), ensemble)
    return classes, lambda v: index[v] if v in index else index[prompt_name(v)]


def items_from_rows(name: str, rows: list[tuple[str, str, str | None]], base: Path, where: Path, templates,
                    classnames=None, ensemble=None, fractions=(0.5, 0.2, 0.3)) -> DatasetSplits:
    """A dataset from (path, class, split or None) rows; rows without a split are
    split per class (seeded), like a folder of class folders."""
    if not rows:
        raise UserError(f"{where}: no images listed")
    classes, label_of = _classes_from_rows(rows, classnames, templates, ensemble, where)
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    unsplit = []
    for path, cname, split in rows:
        item = Item(base / path, label_of(cname))
        (splits[split] if split else unsplit).append(item)
    if unsplit:
        train, val, test = split_per_class(unsplit, fractions)
        splits["train"] += train
        splits["val"] += val
        splits["test"] += test
    return DatasetSplits(name, classes, splits["train"], splits["val"], splits["test"])


#: Why a listed image path is refused (the list names images under one folder, not any file).
_OUTSIDE = ("leads out of {base}, the folder the paths are relative to; set image_root to a folder that holds "
            "every image")


def load_csv(name: str, path: Path, image_root: Path | None, templates: list[str], *, classnames=None,
             ensemble=None) -> DatasetSplits:
    """A CSV with columns ``path``, ``class`` and optionally ``split`` (train/val/test;
    rows without one are split per class, seeded); paths relative to ``image_root``
    (default: the CSV's folder), and inside it. Classes: ``classnames`` in order, else sorted."""
    if not path.is_file():
        raise UserError(f"{path}: CSV file not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "class"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(sorted(missing))} (columns: path, class, "
                            "and optionally split)")
        has_split = "split" in (reader.fieldnames or [])
        raw = list(reader)
    base = image_root or path.parent
    rows = []
    for i, r in enumerate(raw, start=2):
        split = (r.get("split") or "").strip() if has_split else ""
        if split and split not in SPLITS:
            raise UserError(f"{path}:{i}: split {split!r} is not train, val or test")
        if not r["path"] or not r["class"]:
            raise UserError(f"{path}:{i}: empty path or class")
        if not inside(base, r["path"]):
            raise UserError(f"{path}:{i}: image path {r['path']!r} {_OUTSIDE.format(base=base)}")
        rows.append((r["path"], r["class"], split or None))
    return items_from_rows(name, rows, base, path, templates, classnames, ensemble)


def load_json_list(name: str, path: Path, image_root: Path | None, templates: list[str], *, classnames=None,
                   ensemble=None) -> DatasetSplits:
    """A JSON list of images: ``[{"path": ..., "class": ..., "split": ...}, ...]`` or
    ``[[path, class], ...]`` / ``[[path, class, split], ...]`` (split optional), or a
    split file of the benchmark layout (``{"train": [[path, label, class name], ...],
    "val": ..., "test": ...}``, classes by label)."""
    base = image_root or path.parent
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: JSON file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if isinstance(data, dict):
        return _load_split_dict(name, path, data, base, templates, classnames, ensemble)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of images or a split file (train/val/test lists)")
    rows = []
    for i, r in enumerate(data):
        if isinstance(r, dict):
            r = [r.get("path"), r.get("class"), r.get("split")]
        if not (isinstance(r, list) and len(r) in (2, 3) and all(isinstance(v, str) for v in r[:2])):
            raise UserError(f"{path}: entry {i} is not {{path, class, split}} or [path, class(, split)]")
        split = r[2] if len(r) == 3 else None
        if split not in (None, "", *SPLITS):
            raise UserError(f"{path}: entry {i}: split {split!r} is not train, val or test")
        if not inside(base, r[0]):
            raise UserError(f"{path}: entry {i}: image path {r[0]!r} {_OUTSIDE.format(base=base)}")
        rows.append((r[0], r[1], split or None))
    return items_from_rows(name, rows, base, path, templates, classnames, ensemble)


def _load_split_dict(name, path, data, base, templates, classnames, ensemble) -> DatasetSplits:
    if classnames is None:  # class names by label, from the rows themselves
        by_label: dict[int, str] = {}
        for split in SPLITS:
            for row in data.get(split) or []:
                if isinstance(row, list) and len(row) == 3 and isinstance(row[1], int):
                    by_label.setdefault(row[1], row[2])
        gaps = [i for i in range(max(by_label, default=-1) + 1) if i not in by_label]
        if gaps or not by_label:
            raise UserError(f"{path}: no row names label(s) {_first(gaps) or '0'}: give the class list "
                            "(classnames) so every label has a name")
        classnames = [by_label[i] for i in range(len(by_label))]
    names = list(classnames.values()) if isinstance(classnames, dict) else list(classnames)
    classes = ClassSet([prompt_name(c) for c in names], list(templates), ensemble)
    return load_split_file(name, path, base, classes)


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


@dataclass(frozen=True)
class Unreadable:
    """An image that could not be read, in place of its pixels in a batch."""

    path: str
    reason: str

    def message(self) -> str:
        return f"{self.path}: {self.reason}"


#: Pillow modes of 16-bit greyscale (and 32-bit ``I``, as some Pillow versions open 16-bit PNGs).
_WIDE_GREY = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def _to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB. Pillow's own conversion clips 16-bit greyscale at 255
    (a white image), so it is scaled to 8 bits here; a palette with transparency
    goes through RGBA (as Pillow asks), the alpha dropped as by ``convert("RGB")``."""
    if im.mode in _WIDE_GREY:
        wide = np.asarray(im).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def read_rgb(path: Path) -> Image.Image | Unreadable:
    """The image at ``path`` as RGB, or why it cannot be read.

    Whatever the file holds, the outcome is one of the two: a truncated, empty or
    non-image file, or one whose header claims more pixels than Pillow's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; refused before decoding,
    not after Pillow's warning), is an :class:`Unreadable` with the reason."""
    try:
        if Path(path).stat().st_size == 0:
            return Unreadable(str(path), "cannot read image (empty file)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _to_rgb(im)
    except FileNotFoundError:
        return Unreadable(str(path), "image file not found")
    except IsADirectoryError:
        return Unreadable(str(path), "cannot read image (a folder, not a file)")
    except UnidentifiedImageError:
        return Unreadable(str(path), "cannot read image (not an image file, or a format Pillow cannot read)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Unreadable(str(path), f"cannot read image (refused: {exc})")
    except Exception as exc:  # noqa: BLE001 - a decoder fails in many ways on a corrupt file: each is the file's
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Unreadable(str(path), f"cannot read image ({detail})")


class ImageDataset(torch.utils.data.Dataset):
    """``(image tensor, label)`` pairs read from disk.

    An image that cannot be read raises a one-line :class:`UserError` naming it;
    with ``defer_errors`` it comes back as an :class:`Unreadable` instead, so that a
    data-loader worker never raises (see :class:`ImageLoader`)."""

    def __init__(self, items: list[Item], transform, defer_errors: bool = False):
        self.items = items
        self.transform = transform
        self.defer_errors = defer_errors

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        img = read_rgb(item.path)
        if isinstance(img, Unreadable):
            if self.defer_errors:
                return img, item.label
            raise UserError(img.message())
        return self.transform(img), item.label


def collate_readable(batch):
    """``(images, labels, unreadable)``: the readable images stacked, and the
    :class:`Unreadable` entries left out (``images`` is None if none was readable)."""
    good = [(x, y) for x, y in batch if not isinstance(x, Unreadable)]
    bad = [x for x, _ in batch if isinstance(x, Unreadable)]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([y for _, y in good], dtype=torch.long), bad


class UnreadableImages:
    """Images left out of a run because they could not be read (each once)."""

    def __init__(self):
        self.reasons: dict[str, str] = {}

    def add(self, image: Unreadable) -> None:
        self.reasons.setdefault(image.path, image.reason)

    def __len__(self) -> int:
        return len(self.reasons)

    def summary(self, shown: int = 20) -> dict:
        """For ``results.json``: how many, and the first ``shown`` with the reason."""
        return {"count": len(self.reasons),
                "examples": [{"path": p, "reason": r} for p, r in list(self.reasons.items())[:shown]]}


UNREADABLE_POLICIES = ("error", "skip")


class ShuffledBatches(torch.utils.data.Sampler):
    """A fresh random order every epoch, in batches, the last partial batch dropped when
    there is at least one full batch: the order (and the use of ``generator``) of a
    DataLoader with ``shuffle=True``, plus :attr:`skip` to start the next epoch after
    that many batches (a run resumed mid-epoch: the batches it already trained on are
    not read again)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.drop_last = n >= batch_size
        self.skip = 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        torch.randperm(self.n, generator=self.generator)  # as RandomSampler draws at the end of its pass
        skip, self.skip = self.skip, 0
        for b in range(skip, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


class ImageLoader:
    """Batches ``(images, labels)`` of ``items`` through a torch DataLoader.

    An image that cannot be read never surfaces as a traceback from a worker
    process: workers hand it back as :class:`Unreadable`, and here it either stops
    the run with a one-line :class:`UserError` naming the file (``on_unreadable=
    "error"``) or is left out of its batch and recorded in ``unreadable``
    (``"skip"``)."""

    def __init__(self, items: list[Item], transform, batch_size: int, shuffle: bool = False,
                 num_workers: int = 0, seed: int = 0, on_unreadable: str = "error",
                 unreadable: UnreadableImages | None = None):
        if on_unreadable not in UNREADABLE_POLICIES:
            raise ValueError(f"on_unreadable must be one of {UNREADABLE_POLICIES}, not {on_unreadable!r}")
        self.on_unreadable = on_unreadable
        self.unreadable = unreadable if unreadable is not None else UnreadableImages()
        generator = torch.Generator().manual_seed(seed)
        self.batches = ShuffledBatches(len(items), batch_size, generator) if shuffle else None
        self.loader = torch.utils.data.DataLoader(
            ImageDataset(items, transform, defer_errors=True),
            batch_size=1 if shuffle else batch_size,  # 1: the DataLoader's "unset" when batch_sampler batches
            batch_sampler=self.batches,
            num_workers=num_workers,
            generator=generator,
            collate_fn=collate_readable,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, bad in self.loader:
            if bad and self.on_unreadable == "error":
                raise UserError(
                    f"{bad[0].message()}; replace or remove the file, or set 'train: {{unreadable_images: skip}}' "
                    "to leave unreadable images out (they are counted in results.json)"
                )
            for image in bad:
                self.unreadable.add(image)
            if images is not None:
                yield images, labels
