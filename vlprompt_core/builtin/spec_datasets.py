"""The built-in benchmark datasets: one per spec file (:mod:`.spec_files`), the
embedded ones generated on first use.

Their options (the data root, template overrides), reading the dataset in its folder
as the spec lays it out (split file, ImageNet folders, class folders or image lists),
the cheap checks of ``vlprompt validate``, loading, generating an embedded task when it
is missing or stale, and :func:`read_spec_files`, which makes a dataset of every
readable spec file. The ``vlprompt_datasets`` hook that registers them lives in
:mod:`.datasets`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field, ValidationError, field_validator

from ..api import ClassSet, DatasetEntry, DatasetSplits, Options
from ..data import (
    Scan,
    class_count_problem,
    class_folder_problems,
    default_data_root,
    expand_user,
    folder_class_dirs,
    prompt_name,
    scan_class_dirs,
    scan_class_folders,
    scan_image_lists,
    scan_split_file,
)
from ..embedded import tasks as embedded_tasks
from ..errors import UserError
from ..yamlload import load as load_yaml, yaml_problem
from .spec_files import DatasetSpecFile, _templates_have_slot, resolve_parent, spec_dirs

#: Named after the module that registers these datasets, as its warnings always were.
log = logging.getLogger("vlprompt_core.builtin.datasets")


class SpecDatasetOptions(Options):
    """Options of a dataset described by a spec file."""

    spec: ClassVar[DatasetSpecFile]
    spec_path: ClassVar[Path | None] = None

    root: Path | None = Field(
        None,
        validate_default=True,
        description="data root holding the dataset folder (default: $VLPROMPT_DATA, "
        "or ~/.cache/vlprompt/data for embedded datasets)",
    )
    templates: list[str] | None = Field(None, description="override the zero-shot template(s)")
    ensemble: list[str] | None = Field(None, description="override the prompt ensemble (templates: ensemble)")

    _slots = field_validator("templates", "ensemble")(lambda cls, v: _templates_have_slot(v))

    @field_validator("root")
    @classmethod
    def _folder_exists(cls, root: Path | None) -> Path | None:
        spec = cls.spec
        if root is None:
            if spec.embedded is None and "VLPROMPT_DATA" not in os.environ:
                raise ValueError(f"required: the folder that holds {spec.folder}/ (or set $VLPROMPT_DATA)")
            return None
        root = expand_user(root)
        folder = root / spec.folder
        if spec.embedded is None and not folder.is_dir():
            if root.name == spec.folder or (root / spec.image_dir).is_dir():
                raise ValueError(f"dataset folder not found: {folder}; root is the folder that holds "
                                 f"{spec.folder}/, not the dataset folder itself: root: {root.parent}")
            raise ValueError(f"dataset folder not found: {folder} (`vlprompt data check {spec.name} --root {root}` "
                             "shows the layout it needs and where to get it)")
        return root


def embedded_fingerprint(task: str) -> str:
    """Identifies the generator that makes an embedded task (its source and the task)."""
    here = Path(__file__).resolve().parents[1] / "embedded"
    digest = hashlib.sha256(task.encode())
    for name in ("world.py", "tasks.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def embedded_ready(task: str, folder: Path) -> bool:
    """``folder`` holds the embedded task made by the current generator."""
    stamp = folder / ".generator"
    return stamp.is_file() and stamp.read_text().strip() == embedded_fingerprint(task)


def ensure_embedded(task: str, folder: Path) -> None:
    """Generate an embedded dataset unless ``folder`` holds one from the current generator.

    Safe when several processes ask at once (a sweep's ``--jobs``, parallel test workers):
    the task is written, stamp included, into a temporary folder beside ``folder`` and
    renamed into place, so ``folder`` is either absent, stale or complete, never half
    written; where the system has ``flock`` the processes take turns (the others wait, then
    use the first one's), and where it has not, a process whose rename finds ``folder``
    complete uses that one. A stale folder is moved aside before it is removed."""
    if embedded_ready(task, folder):
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _turn(folder.parent / f".{folder.name}.lock"):
        if embedded_ready(task, folder):  # made while this process waited
            return
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            if folder.exists():
                log.warning("regenerating %s: made by another version of the generator", folder)
                try:
                    os.rename(folder, staging / "stale")
                except FileNotFoundError:  # another process moved it first
                    pass
            made = staging / folder.name
            embedded_tasks.write_task(task, made)
            (made / ".generator").write_text(embedded_fingerprint(task) + "\n")
            try:
                os.rename(made, folder)
            except OSError:
                if not embedded_ready(task, folder):  # not another process's complete task
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _turn(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting for it (no lock without ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------- layouts of a spec


def spec_classes(spec: DatasetSpecFile, templates: list[str] | None = None,
                 ensemble: list[str] | None = None) -> ClassSet:
    """The spec's canonical classes, templates and prompt ensemble (options override them)."""
    return ClassSet([prompt_name(c) for c in spec.classnames], list(templates or spec.templates),
                    list(ensemble or spec.ensemble or []) or None)


VAL_FOLDER_FIX = ("the validation tarball is flat: sort its 50,000 images into the 1000 wnid folders with the "
                  "devkit's labels (e.g. valprep.sh from soumith/imagenetloader.torch)")


def scan_spec(spec: DatasetSpecFile, folder: Path, classes: ClassSet, deep: bool = True) -> Scan:
    """Read the dataset in ``folder`` as ``spec`` lays it out. ``deep=False`` is the
    cheap version for ``validate``: class folders are compared, their images not listed."""
    image_dir = (folder / spec.image_dir).resolve() if spec.image_dir == "." else folder / spec.image_dir
    if spec.layout == "split_file":
        scan = scan_split_file(folder / spec.split_file, image_dir, classes)
        if not image_dir.is_dir():
            scan.problems.append(f"image folder not found: {image_dir} (split-file paths are relative to it)")
        return scan
    if spec.layout == "image_lists":
        scan = scan_image_lists(folder, image_dir, dict(spec.split_lists), spec.image_suffix, classes)
        if not image_dir.is_dir():
            scan.problems.append(f"image folder not found: {image_dir}")
        return scan
    class_dirs = spec.class_dir_list()
    if spec.layout == "imagenet":
        scan = Scan()
        for split, sub in (("train", "train"), ("test", "val")):
            where = image_dir / sub
            if not where.is_dir():
                scan.problems.append(f"folder not found: {where} (expected {spec.image_dir}/{sub}/<wnid>/*.JPEG)")
                continue
            fs = scan_class_dirs(where, class_dirs, list_images=deep)
            fix = VAL_FOLDER_FIX if sub == "val" else ""
            scan.problems += class_folder_problems(where, fs, class_dirs, classes.names, loose_fix=fix)
            scan.splits[split] = fs.items
        return scan
    # class_folders
    if class_dirs is None:
        if not image_dir.is_dir():
            return Scan(problems=[f"image folder not found: {image_dir}"])
        try:
            class_dirs = folder_class_dirs(image_dir, spec.classnames, test_only=spec.test_only)
        except UserError as exc:
            return Scan(problems=exc.problems)
    return scan_class_folders(image_dir, classes, class_dirs, test_only=spec.test_only, list_images=deep)


def coverage_problems(spec: DatasetSpecFile, scan: Scan, where: Path) -> list[str]:
    """Classes of the spec with no image in any split (a wrong or truncated split file)."""
    seen = {it.label for items in scan.splits.values() for it in items}
    missing = [i for i in range(len(spec.classnames)) if i not in seen]
    if not missing or scan.problems:
        return []
    shown = ", ".join(f"{spec.classnames[i]!r} (label {i})" for i in missing[:3])
    more = f", ... ({len(missing)} in all)" if len(missing) > 3 else ""
    return [f"{where}: covers {len(spec.classnames) - len(missing)} of the {len(spec.classnames)} classes of the "
            f"dataset spec; no image of {shown}{more}: is this the split file of another dataset version?"]


def spec_where(spec: DatasetSpecFile, folder: Path) -> Path:
    """The file or folder that holds the dataset's split (for messages)."""
    if spec.layout == "split_file":
        return folder / spec.split_file
    return folder / spec.image_dir


def check_spec_dataset(spec: DatasetSpecFile, opts: SpecDatasetOptions) -> list[str]:
    """The cheap checks (``vlprompt validate``, and before every run): at least two
    classes, the folders the layout needs, a split file that parses and agrees with the
    spec (labels, class names, every class present), class folders named as the spec's
    classes, each holding an image."""
    if spec.classnames is not None and (few := class_count_problem(spec.name, spec.classnames)) is not None:
        return [few]
    if spec.embedded is not None:
        return []  # generated on first use
    folder = (opts.root or default_data_root()) / spec.folder
    if not folder.is_dir():
        return [f"dataset folder not found: {folder} (`vlprompt data check {spec.name}` shows the layout it needs "
                "and where to get it)"]
    scan = scan_spec(spec, folder, spec_classes(spec), deep=False)
    if spec.layout in ("split_file", "image_lists"):
        return scan.problems + coverage_problems(spec, scan, spec_where(spec, folder))
    return scan.problems


def load_spec_dataset(spec: DatasetSpecFile, opts: SpecDatasetOptions) -> DatasetSplits:
    root = opts.root or default_data_root()
    folder = root / spec.folder
    if spec.embedded is not None:
        ensure_embedded(spec.embedded, folder)
    elif not folder.is_dir():
        raise UserError(f"dataset folder not found: {folder}")
    classes = spec_classes(spec, opts.templates, opts.ensemble)
    scan = scan_spec(spec, folder, classes)
    scan.raise_problems()
    return DatasetSplits(spec.name, classes, scan.splits["train"], scan.splits["val"], scan.splits["test"])


def _make_spec_dataset(spec: DatasetSpecFile, path: Path | None = None) -> DatasetEntry:
    options = type(f"{spec.name.title().replace('_', '')}Options", (SpecDatasetOptions,),
                   {"spec": spec, "spec_path": path})
    return DatasetEntry(spec.name, options, lambda opts: load_spec_dataset(spec, opts), spec.title,
                        check=lambda opts: check_spec_dataset(spec, opts),
                        classes=lambda opts: spec_classes(spec, opts.templates, opts.ensemble))


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> Any:
    """The YAML of a spec file, parsed once per content in a process (every registry build
    reads every spec file, and the YAML parser was most of its cost); callers copy it."""
    return load_yaml(text)


def read_spec_files() -> tuple[list[DatasetEntry], list[str]]:
    """Every readable spec file as a dataset; problems with a file are returned, not raised."""
    specs: dict[str, tuple[DatasetSpecFile, Path]] = {}
    problems = []
    for d in spec_dirs():
        for path in sorted(d.glob("*.yaml")):
            try:
                spec = DatasetSpecFile.model_validate(copy.deepcopy(_parsed(path.read_text())))
            except yaml.YAMLError as exc:
                problems.append(f"{path}: {yaml_problem(exc)}")
                continue
            except ValidationError as exc:
                e = exc.errors()[0]
                where = ".".join(str(p) for p in e["loc"])
                problems.append(f"{path}: {where + ': ' if where else ''}{e['msg']}")
                continue
            except (ValueError, RecursionError) as exc:  # not UTF-8, an impossible date, nesting too deep
                problems.append(f"{path}: not a dataset spec ({str(exc).strip() or type(exc).__name__})")
                continue
            specs[spec.name] = (spec, path)
    entries = []
    for name, (spec, path) in specs.items():
        if spec.parent is not None:
            if spec.parent not in specs:
                problems.append(f"{path}: parent {spec.parent!r}: no such dataset spec")
                continue
            spec, wrong = resolve_parent(spec, specs[spec.parent][0])
            if wrong:
                problems += [f"{path}: {w}" for w in wrong]
                continue
        entries.append(_make_spec_dataset(spec, path))
    return entries, problems
