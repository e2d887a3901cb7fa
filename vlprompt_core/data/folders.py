"""The class-folder layouts on disk: ``root/<class>/*.jpg`` (split per class, seeded)
or ``root/{train,val,test}/<class>/*.jpg``, and ImageNet's ``train/`` and ``val/`` of
wnid folders. Scanning the class folders of one folder (:func:`scan_class_dirs`),
pairing folders with a class list, the seeded per-class split, and loading a user's
folder of class folders as a dataset (:func:`load_class_folders`)."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..api import ClassSet, DatasetSplits, Item
from ..errors import UserError
from .classes import user_classes
from .paths import prompt_name
from .scan import SPLITS, Scan, _first

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` holds an image (stops at the first one: cheap)."""
    with os.scandir(folder) as entries:
        return any(os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file() for e in entries)


#: How to fix a class folder without images.
EMPTY_FIX = ("every class needs images (a class without any still draws predictions, and accuracy falls): add its "
             "images ({}), or remove the folder if it is not a class").format(", ".join(sorted(IMAGE_SUFFIXES)))


@dataclass
class FolderScan:
    """The class folders found in one folder: items by label, and what does not fit
    (``empty``: class folders found without any image)."""

    items: list[Item]
    found: set[str]
    extra: list[str]
    loose: list[Path]
    empty: list[str] = field(default_factory=list)


def scan_class_dirs(folder: Path, class_dirs: list[str], list_images: bool = True) -> FolderScan:
    """Images under ``folder/<class_dirs[label]>/``; sub-folders the list does not
    have (``extra``), images lying directly in ``folder`` (``loose``) and class folders
    without images (``empty``) are reported. ``list_images=False`` only looks at the
    folder itself and for a first image in each class folder (cheap)."""
    known = {d: label for label, d in enumerate(class_dirs)}
    items, found, extra, loose, empty = [], set(), [], [], []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if entry.name not in known:
                extra.append(entry.name)
                continue
            found.add(entry.name)
            if list_images:
                images = _images_in(entry)
                items += [Item(f, known[entry.name]) for f in images]
            if not (images if list_images else _has_image(entry)):
                empty.append(entry.name)
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            loose.append(entry)
    items.sort(key=lambda it: (it.label, str(it.path)))
    return FolderScan(items, found, extra, loose, empty)


def empty_folders_problem(folder: Path, empty: list[str], where: str = "") -> str:
    """One line for class folders of ``folder`` without images."""
    if len(empty) == 1:
        return f"{folder / empty[0]}: class folder with no images{where}; {EMPTY_FIX}"
    return f"{folder}: {len(empty)} class folders with no images{where}: {_first(empty)}; {EMPTY_FIX}"


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
    if require_all and scan.empty:
        problems.append(empty_folders_problem(folder, scan.empty))
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
        filled: set[str] = set()
        for split in SPLITS:
            if not (root / split).is_dir():
                continue
            fs = scan_class_dirs(root / split, class_dirs, list_images)
            scan.problems += class_folder_problems(root / split, fs, class_dirs, classes.names, require_all=False)
            scan.splits[split] = fs.items
            found |= fs.found
            filled |= fs.found - set(fs.empty)
        missing = [class_dirs[i] for i in range(len(class_dirs)) if class_dirs[i] not in found]
        if missing:
            scan.problems.append(f"{root}: no folder for class(es) {_first(missing)} in train/, val/ or test/")
        empty = [d for d in class_dirs if d in found and d not in filled]
        if empty:
            scan.problems.append(empty_folders_problem(root, empty, " in train/, val/ or test/"))
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
    = mapping order), or by default the sorted folder names. Two class names that read
    alike in a prompt, and a class folder without images, are errors."""
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    if classnames is None:
        train, only_eval = _folder_dirs(root, test_only)
        if only_eval:
            raise UserError(f"{root}: class folders not in train/: {', '.join(only_eval)}")
        if not train:
            raise UserError(f"{root}: no class subfolders (expected {root}/<class>/*.jpg, or train/ and test/ "
                            "holding class folders)")
        class_dirs = train
        classes = user_classes(train, templates, ensemble, f"{root}: class folders",
                               "merge their images into one folder, or rename one")
    else:
        names = list(classnames.values()) if isinstance(classnames, dict) else list(classnames)
        classes = user_classes(names, templates, ensemble, "classnames", "give each class once, under a name of its own")
        class_dirs = folder_class_dirs(root, classnames, test_only)
    scan = scan_class_folders(root, classes, class_dirs, test_only=test_only, fractions=fractions)
    scan.raise_problems()
    return DatasetSplits(name, classes, scan.splits["train"], scan.splits["val"], scan.splits["test"])
