"""The benchmark layout on disk: a split file, a JSON of ``train``/``val``/``test``
lists of ``[image path, label, class name]`` with paths relative to an image folder
(CoOp's ``split_zhou_*.json``). Reading it (:func:`read_split_json`), checking every
row against the dataset's canonical classes (:func:`scan_split_file`) and loading it
as a dataset (:func:`load_split_file`)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..api import ClassSet, DatasetSplits, Item
from .paths import inside, prompt_name
from .scan import SPLITS, Scan, _first


def _same_class(a: str, b: str) -> bool:
    return prompt_name(a).lower() == prompt_name(b).lower()


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
