"""Lists of images on disk: one text file per split of ``<image id> <class name>``
lines (FGVC-Aircraft's official lists, :func:`scan_image_lists`), and a user's CSV
(:func:`load_csv`) or JSON list (:func:`load_json_list`) of image path, class and
optional split. Rows without a split are split per class, seeded, as a folder of
class folders is; a JSON in the benchmark split-file layout is read as one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..api import ClassSet, DatasetSplits, Item
from ..errors import UserError
from .classes import user_classes
from .folders import split_per_class
from .paths import inside, prompt_name
from .scan import SPLITS, Scan, _first
from .splitfiles import load_split_file


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
    every class a row names must be in it) or the sorted class values (no two of which
    may read alike in a prompt)."""
    values = sorted({r[1] for r in rows})
    if classnames is None:
        names, index = values, {v: i for i, v in enumerate(values)}
        what, fix = f"{where}: class values", "write each class the same way in every row"
    else:
        what, fix = "classnames", "give each class once, under a name of its own"
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
    classes = user_classes(names, templates, ensemble, what, fix)
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
        what, fix = f"{path}: the class names of labels", "name each class the same way in every row, and two classes differently"
    else:
        what, fix = "classnames", "give each class once, under a name of its own"
    names = list(classnames.values()) if isinstance(classnames, dict) else list(classnames)
    classes = user_classes(names, templates, ensemble, what, fix)
    return load_split_file(name, path, base, classes)
