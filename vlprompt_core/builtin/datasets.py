"""Built-in datasets: one per file in ``datasets_spec/``, plus ``folder`` and ``csv``
for a user's own images (no code needed)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import hookimpl
from ..api import ClassSet, DatasetEntry, DatasetSplits, Options
from ..data import default_data_root, load_class_folders, load_csv, load_imagenet_layout, load_split_file, prompt_name

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["a photo of a {}."]


class DatasetSpecFile(BaseModel):
    """The format of a ``datasets_spec/*.yaml`` file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    title: str = ""
    layout: Literal["split_file", "imagenet", "class_folders"]
    #: Folder under the data root.
    folder: str
    #: Image folder under ``folder`` that split-file paths are relative to.
    image_dir: str = "images"
    split_file: str | None = None
    #: Task of the embedded world that generates this dataset when it is missing.
    embedded: str | None = None
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1)
    #: Canonical class names; index = label.
    classnames: list[str] = Field(min_length=1)
    source: str = ""


def spec_dirs() -> list[Path]:
    """Where dataset spec files are read from: the installed copy (or the source
    checkout's ``datasets_spec/``), then each folder in ``$VLPROMPT_DATASETS_SPEC``."""
    here = Path(__file__).resolve().parents[1]
    dirs = [d for d in (here / "_datasets_spec", here.parent / "datasets_spec") if d.is_dir()][:1]
    extra = os.environ.get("VLPROMPT_DATASETS_SPEC", "")
    dirs += [Path(p).expanduser() for p in extra.split(os.pathsep) if p]
    return dirs


class SpecDatasetOptions(Options):
    """Options of a dataset described by a spec file."""

    spec: ClassVar[DatasetSpecFile]

    root: Path | None = Field(
        None,
        validate_default=True,
        description="data root holding the dataset folder (default: $VLPROMPT_DATA, "
        "or ~/.cache/vlprompt/data for embedded datasets)",
    )
    templates: list[str] | None = Field(None, description="override the zero-shot template(s)")

    @field_validator("root")
    @classmethod
    def _folder_exists(cls, root: Path | None) -> Path | None:
        spec = cls.spec
        if root is None:
            if spec.embedded is None and "VLPROMPT_DATA" not in os.environ:
                raise ValueError(f"required: the folder that holds {spec.folder}/ (or set $VLPROMPT_DATA)")
            return None
        root = root.expanduser()
        folder = root / spec.folder
        if spec.embedded is None and not folder.is_dir():
            raise ValueError(f"dataset folder not found: {folder}")
        return root


def embedded_fingerprint(task: str) -> str:
    """Identifies the generator that makes an embedded task (its source and the task)."""
    here = Path(__file__).resolve().parents[1] / "embedded"
    digest = hashlib.sha256(task.encode())
    for name in ("world.py", "tasks.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def ensure_embedded(task: str, folder: Path) -> None:
    """Generate an embedded dataset unless ``folder`` holds one from the current generator."""
    from ..embedded.tasks import write_task

    stamp = folder / ".generator"
    want = embedded_fingerprint(task)
    if stamp.is_file() and stamp.read_text().strip() == want:
        return
    if folder.exists():
        log.warning("regenerating %s: made by another version of the generator", folder)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_task(task, folder)
    stamp.write_text(want + "\n")


def check_spec_dataset(spec: DatasetSpecFile, opts: SpecDatasetOptions) -> list[str]:
    """The cheap checks: the folders the layout needs, and a split file that parses."""
    if spec.embedded is not None:
        return []  # generated on first use
    folder = (opts.root or default_data_root()) / spec.folder
    if not folder.is_dir():
        return [f"dataset folder not found: {folder}"]
    if spec.layout == "split_file":
        split_file = folder / spec.split_file
        if not split_file.is_file():
            return [f"split file not found: {split_file} (dataset {spec.name!r} needs it; see its spec file)"]
        try:
            data = json.loads(split_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return [f"{split_file}: not valid JSON ({exc})"]
        missing = [k for k in ("train", "val", "test") if not isinstance(data, dict) or not isinstance(data.get(k), list)]
        problems = [f"{split_file}: missing list {k!r}" for k in missing]
        if not (folder / spec.image_dir).is_dir():
            problems.append(f"image folder not found: {folder / spec.image_dir}")
        return problems
    if spec.layout == "imagenet":
        return [f"folder not found: {folder / 'images' / s} (expected images/{s}/<wnid>/...)"
                for s in ("train", "val") if not (folder / "images" / s).is_dir()]
    if not (folder / spec.image_dir).is_dir():
        return [f"image folder not found: {folder / spec.image_dir}"]
    return []


def _make_spec_dataset(spec: DatasetSpecFile) -> DatasetEntry:
    options = type(f"{spec.name.title().replace('_', '')}Options", (SpecDatasetOptions,), {"spec": spec})

    def load(opts: SpecDatasetOptions) -> DatasetSplits:
        root = opts.root or default_data_root()
        folder = root / spec.folder
        if spec.embedded is not None:
            ensure_embedded(spec.embedded, folder)
        classes = ClassSet([prompt_name(c) for c in spec.classnames], opts.templates or spec.templates)
        if spec.layout == "split_file":
            return load_split_file(spec.name, folder / spec.split_file, folder / spec.image_dir, classes)
        if spec.layout == "imagenet":
            return load_imagenet_layout(spec.name, folder, classes)
        return load_class_folders(spec.name, folder / spec.image_dir, classes.templates)

    return DatasetEntry(spec.name, options, load, spec.title, check=lambda opts: check_spec_dataset(spec, opts))


def read_spec_files() -> tuple[list[DatasetEntry], list[str]]:
    """Every readable spec file as a dataset; problems with a file are returned, not raised."""
    plugins, problems = [], []
    for d in spec_dirs():
        for path in sorted(d.glob("*.yaml")):
            try:
                spec = DatasetSpecFile.model_validate(yaml.safe_load(path.read_text()))
            except (yaml.YAMLError, ValidationError) as exc:
                problems.append(f"{path}: {exc}".splitlines()[0])
                continue
            if spec.split_file is None and spec.layout == "split_file":
                problems.append(f"{path}: layout split_file needs split_file")
                continue
            plugins.append(_make_spec_dataset(spec))
    return plugins, problems


class FolderOptions(Options):
    """``dataset: {name: folder, path: DIR}``: class subfolders, optionally under train/val/test."""

    path: Path = Field(description="folder of class subfolders, or of train/, val/, test/ with class subfolders")
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1)

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not path.expanduser().is_dir():
            raise ValueError(f"dataset folder not found: {path}")
        return path.expanduser()


class CsvOptions(Options):
    """``dataset: {name: csv, path: FILE}``: columns path, class, split."""

    path: Path = Field(description="CSV with columns path, class, split (train/val/test)")
    image_root: Path | None = Field(None, description="folder the paths are relative to (default: the CSV's)")
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1)

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not path.expanduser().is_file():
            raise ValueError(f"CSV file not found: {path}")
        return path.expanduser()


@hookimpl
def vlprompt_datasets() -> list[DatasetEntry]:
    plugins, problems = read_spec_files()
    for p in problems:
        log.warning("skipping dataset spec %s", p)
    plugins.append(
        DatasetEntry("folder", FolderOptions, lambda o: load_class_folders(o.path.name, o.path, o.templates),
                      "a folder of class subfolders (your own images)")
    )
    plugins.append(
        DatasetEntry("csv", CsvOptions, lambda o: load_csv(o.path.stem, o.path, o.image_root, o.templates),
                      "a CSV of path, class, split (your own images)")
    )
    return plugins

