"""``vlprompt data list`` and ``vlprompt data check``: which datasets are where, and
precisely what is wrong with one (with the fix).

The cheap part of the checks (folders, split files, class lists) is each dataset's
``check`` and runs for ``vlprompt validate`` and before every run; ``data check``
adds what needs every file: each referenced image present, a sample decodable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import DatasetEntry, DatasetSplits, Item
from .builtin.spec_datasets import (
    coverage_problems,
    embedded_ready,
    load_spec_dataset,
    scan_spec,
    spec_classes,
    spec_where,
)
from .builtin.spec_files import DatasetSpecFile
from .data import SPLITS, Unreadable, alike_names, dataset_problems, default_data_root, read_rgb
from .errors import UserError
from .prompting import TemplateChoice, handwritten_length_problem, templates_for

#: Missing or unreadable files named in a problem line.
SHOWN = 3


def spec_of(entry: DatasetEntry) -> DatasetSpecFile | None:
    """The spec file behind a dataset, if it has one."""
    return getattr(entry.options, "spec", None)


def _n(k: int) -> str:
    return f"{k:,}"


# --------------------------------------------------------------------- layout


def expected_layout(spec: DatasetSpecFile, root: Path) -> list[str]:
    """The folder tree a spec expects under ``root``, one line each."""
    top = f"{root / spec.folder}/"
    img = "" if spec.image_dir == "." else f"{spec.image_dir}/"
    dirs = spec.class_dir_list()
    example = (dirs[0] if dirs else spec.classnames[0]) if spec.classnames else "<class>"
    if spec.layout == "split_file":
        inner = f"{img}...  (the image paths the split file names, relative to {img or 'this folder'})"
        return [top, f"  {spec.split_file}", f"  {inner}"]
    if spec.layout == "image_lists":
        return [top, *[f"  {f}  ('<image id> <class name>' lines)" for f in spec.split_lists.values()],
                f"  {img}<image id>{spec.image_suffix}"]
    if spec.layout == "imagenet":
        n = len(spec.classnames)
        return [top, f"  {img}train/{example}/*.JPEG  ({n} class folders, named by wnid)",
                f"  {img}val/{example}/*.JPEG  ({n} class folders: val sorted into class folders)"]
    wnids = dirs and all(len(d) == 9 and d[0] == "n" and d[1:].isdigit() for d in dirs)
    what = "named by label, 0 .. " + str(len(spec.classnames) - 1) if spec.class_dirs == "index" else (
        "named by wnid" if wnids else "one per class")
    return [top, f"  {img}{example}/*  ({len(spec.classnames)} class folders, {what})"]


def root_hint(spec: DatasetSpecFile, root: Path) -> str:
    """How to fix a dataset folder that is not where the spec looks for it."""
    if root.name == spec.folder or (root / spec.image_dir).is_dir() or (
            spec.split_file and (root / spec.split_file).is_file()):
        return (f"--root is the folder that *holds* {spec.folder}/, not the dataset folder itself: "
                f"give --root {root.parent}")
    return ("put the dataset there (expected layout above), or give the data root that holds it with --root "
            "(or $VLPROMPT_DATA)")


def layout_help(spec: DatasetSpecFile, root: Path) -> list[str]:
    """Expected layout and how to obtain the data: printed when it is not found."""
    lines = ["expected layout:", *[f"  {line}" for line in expected_layout(spec, root)]]
    if spec.obtain:
        lines += ["how to obtain it:", *[f"  {line}" for line in spec.obtain.strip().splitlines()]]
    return lines


# ----------------------------------------------------------------------- list


@dataclass
class Status:
    """One row of ``vlprompt data list``."""

    name: str
    title: str
    kind: str  # "benchmark", "embedded", "custom"
    classes: int | None = None
    folder: str | None = None
    state: str = ""
    counts: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def dataset_status(entry: DatasetEntry, root: Path) -> Status:
    spec = spec_of(entry)
    if spec is None:
        return Status(entry.name, entry.description, "custom", state="your own images: options in a run spec")
    status = Status(spec.name, spec.title, "embedded" if spec.embedded else "benchmark", len(spec.classnames),
                    str(root / spec.folder))
    folder = root / spec.folder
    if spec.embedded and not embedded_ready(spec.embedded, folder):
        status.state = "generated on first use"
        return status
    if not folder.is_dir():
        status.state = "not found"
        return status
    try:
        ds = load_spec_dataset(spec, entry.options.model_construct(root=root, templates=None, ensemble=None))
    except UserError as exc:
        status.state = f"error: {exc.problems[0]}"
        return status
    status.state = "found"
    status.counts = {s: len(getattr(ds, s)) for s in SPLITS}
    return status


def list_datasets(registry, root: Path | None = None) -> list[Status]:
    """Every registered dataset: whether it is found under ``root`` and its split sizes."""
    root = Path(root).expanduser() if root else default_data_root()
    rows = [dataset_status(registry.get("dataset", name), root) for name in registry.names("dataset")]
    order = {"benchmark": 0, "embedded": 1, "custom": 2}
    return sorted(rows, key=lambda r: (order[r.kind], r.name))


# ---------------------------------------------------------------------- check


@dataclass
class Report:
    """What ``vlprompt data check`` says about one dataset: report lines, and
    problems (one line each: what is wrong, and the fix)."""

    name: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    help: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _relative(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return str(path.relative_to(base))
        except ValueError:
            pass
    return str(path)


def _sample(items: list[Item], k: int) -> list[Item]:
    """``k`` items spread evenly over ``items`` (deterministic)."""
    if k <= 0 or not items:
        return []
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def check_images(ds: DatasetSplits, report: Report, sample: int, base: Path | None = None,
                 sizes: dict[str, int] | None = None, where: str = "the dataset") -> None:
    """Counts per split, every image present, a sample decodable, and what every dataset
    must be (:func:`~vlprompt_core.data.dataset_problems`: two classes or more, each
    with images) when its layout had no problem that explains otherwise."""
    everything = ds.train + ds.val + ds.test
    seen = {it.label for it in everything}
    names = ds.classes.names
    empty = [names[i] for i in range(len(ds.classes)) if i not in seen]
    report.lines.append(f"  classes   {len(ds.classes)}" + (f", {len(empty)} without images" if empty else ""))
    if not report.problems:
        report.problems += dataset_problems(ds)
    for group in alike_names(names):  # a spec file's or plug-in's class list, taken as written
        report.lines.append(f"  note      classes {' and '.join(f'{names[i]!r} (label {i})' for i in group)} read the "
                            "same in a prompt; kept as the dataset's class list gives them")
    for split in SPLITS:
        items = getattr(ds, split)
        published = f"  (published: {_n(sizes[split])})" if sizes and split in sizes else ""
        report.lines.append(f"  {split:<9} {_n(len(items)) + ' images' if items else '-'}{published}")
    unique = list(dict.fromkeys(it.path for it in everything))
    missing = [p for p in unique if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(_relative(p, base) for p in missing[:SHOWN])
        report.problems.append(
            f"{_n(len(missing))} of the {_n(len(unique))} images {where} names are missing (first: {shown}); "
            "the image folder is incomplete or is not the one the split was made for: extract the original "
            "archive into it (file names must be the original ones)"
        )
        report.lines.append(f"  files     {_n(len(unique))} listed, {_n(len(missing))} missing")
    else:
        report.lines.append(f"  files     {_n(len(unique))} listed, all present")
    gone = set(missing)
    candidates = [it for it in dict.fromkeys(everything) if it.path not in gone]
    picked = _sample(candidates, sample)
    bad = [(it, r) for it in picked if isinstance(r := read_rgb(it.path), Unreadable)]
    if bad:
        shown = "; ".join(f"{_relative(it.path, base)} ({r.reason})" for it, r in bad[:SHOWN])
        report.problems.append(
            f"{len(bad)} of {len(picked)} sampled images cannot be decoded: {shown}; download these files again "
            "(or run with train.unreadable_images: skip to leave unreadable images out)"
        )
    report.lines.append(f"  decoding  {len(picked)} sampled images, "
                        f"{'all readable' if not bad else f'{len(bad)} unreadable'}")


def check_spec_dataset_deep(entry: DatasetEntry, spec: DatasetSpecFile, root: Path, sample: int = 32) -> Report:
    """Everything ``vlprompt data check NAME`` looks at for a spec'd dataset."""
    report = Report(spec.name)
    folder = root / spec.folder
    report.lines.append(f"{spec.name} ({spec.title or spec.name}) at {folder}")
    if spec.embedded is not None:
        if not embedded_ready(spec.embedded, folder):
            report.lines.append("  generated on first use (vlprompt run makes it); nothing to check yet")
            return report
    elif not folder.is_dir():
        report.problems.append(f"dataset folder not found: {folder}; {root_hint(spec, root)}")
        report.help = layout_help(spec, root)
        return report
    classes = spec_classes(spec)
    scan = scan_spec(spec, folder, classes)
    report.problems += scan.problems
    if spec.layout in ("split_file", "image_lists"):
        report.problems += coverage_problems(spec, scan, spec_where(spec, folder))
    ds = DatasetSplits(spec.name, classes, scan.splits["train"], scan.splits["val"], scan.splits["test"])
    report.lines.append(f"  layout    {spec.layout}: " + "; ".join(line.strip() for line in
                                                               expected_layout(spec, root)[1:]))
    what = {"split_file": "the split file", "image_lists": "the split lists"}.get(spec.layout, "the class folders")
    check_images(ds, report, sample, base=folder, sizes=spec.sizes, where=what)
    if report.problems:
        report.help = layout_help(spec, root)
    return report


def check_loaded(name: str, load, section, sample: int = 32) -> Report:
    """``data check`` for a dataset without a spec file (a user's own images): load it
    through its plug-in, then check its images."""
    report = Report(name)
    try:
        ds = load(section)
    except UserError as exc:
        report.lines.append(f"{name}")
        report.problems += exc.problems
        return report
    report.lines.append(f"{name} ({ds.name})")
    base = getattr(section, "path", None)
    base = base if base is None or base.is_dir() else base.parent
    check_images(ds, report, sample, base=base, where="the dataset")
    return report


def prompt_problems(registry, backbone, sections: list[tuple[str, Any]], methods: list) -> list[str]:
    """``vlprompt validate`` and ``vlprompt data check SPEC``: each class name alone, and
    the hand-written prompts the methods make (their options typed
    :data:`~vlprompt_core.prompting.TemplateChoice`, e.g. zero-shot's ``templates``),
    fit the backbone's text context, as its entry tells without loading weights
    (``text_context``); one line per dataset section (``(where, section)``) where one
    does not (:func:`~vlprompt_core.prompting.prompt_length_problem`). Prompts with
    learned context vectors are checked as their method is built."""
    entry = registry.get("backbone", backbone.name)
    try:
        told = entry.text_context(backbone) if entry.text_context is not None else None
    except (UserError, OSError):
        told = None  # the backbone's check says why
    if told is None:
        return []
    count, context = told
    choices = [(f"method {m.label} ({field}): ", getattr(m.options, field)) for m in methods
               for field, info in type(m.options).model_fields.items() if info.annotation == TemplateChoice]
    problems = []
    for where, section in sections:
        dataset = registry.get("dataset", section.name)
        try:
            classes = dataset.classes(section) if dataset.classes is not None else None
        except (UserError, OSError):
            classes = None  # the dataset's check says why
        if classes is None:
            continue
        for who, choice in [("", ["{}"]), *choices]:
            line = handwritten_length_problem(classes.names, templates_for(choice, classes), count, context)
            if line:
                problems.append(f"{where}: {who}{line}")
                break
    return problems


def check_section(registry, section, sample: int = 32) -> Report:
    """``data check`` of one dataset section of a run spec."""
    entry = registry.get("dataset", section.name)
    spec = spec_of(entry)
    if spec is not None:
        return check_spec_dataset_deep(entry, spec, section.root or default_data_root(), sample)
    return check_loaded(section.name, entry.load, section, sample)


def check_named(registry, name: str, root: Path | None, sample: int = 32) -> Report:
    """``vlprompt data check NAME``."""
    entry = registry.get("dataset", name)
    spec = spec_of(entry)
    if spec is None:
        raise UserError(f"dataset {name!r} takes options (e.g. a path): check it through a run spec that uses it: "
                        f"vlprompt data check my_spec.yaml")
    root = Path(root).expanduser() if root else default_data_root()
    return check_spec_dataset_deep(entry, spec, root, sample)
