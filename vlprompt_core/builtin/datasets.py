"""Built-in datasets: one per file in ``datasets_spec/``, plus ``folder``, ``csv`` and
``json`` for a user's own images (no code needed).

A spec file (:class:`DatasetSpecFile`) says everything vlprompt needs to know about a
benchmark: canonical class names (index = label), the zero-shot template(s) and prompt
ensemble the literature uses for it, the on-disk layout, the published split sizes,
and, for humans, where the images and split files come from and what is odd about it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import hookimpl
from ..api import ClassSet, DatasetEntry, DatasetSplits, Options
from ..data import (
    Scan,
    class_folder_problems,
    default_data_root,
    expand_user,
    folder_class_dirs,
    load_class_folders,
    load_csv,
    load_json_list,
    prompt_name,
    scan_class_dirs,
    scan_class_folders,
    scan_image_lists,
    scan_split_file,
)
from ..errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["a photo of a {}."]

Split = Literal["train", "val", "test"]


def _names_as_text(value):
    """Class lists from YAML: folder names like ``0`` or ``1998`` arrive as numbers."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        return [v if isinstance(v, str) else str(v) for v in value]
    return value


def _templates_have_slot(value: list[str] | None) -> list[str] | None:
    bad = [t for t in value or [] if "{}" not in t]
    if bad:
        raise ValueError(f"each template needs a '{{}}' for the class name: {bad}")
    return value


class DatasetSpecFile(BaseModel):
    """The format of a ``datasets_spec/*.yaml`` file (see docs/datasets.md)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    title: str = ""
    #: ``split_file``: a JSON of train/val/test lists of [path, label, class name];
    #: ``imagenet``: ``<image_dir>/train/<class dir>/`` and ``<image_dir>/val/<class dir>/``
    #: (val is the test split); ``class_folders``: ``<image_dir>/<class dir>/`` (or
    #: ``train/ val/ test/`` of them); ``image_lists``: one ``<image id> <class name>``
    #: text file per split (FGVC-Aircraft).
    layout: Literal["split_file", "imagenet", "class_folders", "image_lists"]
    #: Folder under the data root.
    folder: str
    #: Image folder under ``folder`` that the layout's paths are relative to.
    image_dir: str = "images"
    split_file: str | None = None
    #: ``image_lists`` layout: the list file of each split, under ``folder``.
    split_lists: dict[Split, str] | None = None
    #: ``image_lists`` layout: appended to each image id to make the file name.
    image_suffix: str = ""
    #: Folder of each class (index = label) for the folder layouts; ``index``: folders
    #: named 0, 1, ...; default: folders named as the class names.
    class_dirs: list[str] | Literal["index"] | None = None
    #: ``class_folders`` layout: every image is a test image (no train or val split).
    test_only: bool = False
    #: Another spec file whose classes these are (all of them, or those at
    #: ``parent_labels``); class names and class folders default to the parent's.
    parent: str | None = None
    #: The parent's label of each class here (index = label here).
    parent_labels: list[int] | None = None
    #: Task of the embedded world that generates this dataset when it is missing.
    embedded: str | None = None
    #: The dataset's own zero-shot template(s); the first is *the* zero-shot prompt.
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1)
    #: The prompt ensemble the literature uses for this dataset (``templates: ensemble``).
    ensemble: list[str] | None = Field(None, min_length=1)
    #: Canonical class names; index = label.
    classnames: list[str] | None = Field(None, min_length=1)

    _text = field_validator("classnames", "class_dirs", mode="before")(lambda cls, v: _names_as_text(v))
    #: Published number of images per split (reported by ``vlprompt data check``).
    sizes: dict[Split, int] | None = None
    #: Home page.
    source: str = ""
    #: Where the images and split files come from, for humans.
    obtain: str = ""
    #: What is odd about this dataset, for humans.
    quirks: str = ""

    _slots = field_validator("templates", "ensemble")(lambda cls, v: _templates_have_slot(v))

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.layout == "split_file" and not self.split_file:
            problems.append("layout split_file needs split_file")
        if self.layout == "image_lists" and not self.split_lists:
            problems.append("layout image_lists needs split_lists")
        if self.layout == "imagenet" and not isinstance(self.class_dirs, list) and self.parent is None:
            problems.append("layout imagenet needs class_dirs (the wnid of each class)")
        if self.test_only and self.layout != "class_folders":
            problems.append("test_only applies to layout class_folders")
        if self.classnames is None and self.parent is None:
            problems.append("classnames: required (or a parent whose classes these are)")
        if self.parent_labels is not None and self.parent is None:
            problems.append("parent_labels needs parent")
        n = len(self.classnames) if self.classnames else len(self.parent_labels or []) or None
        for key in ("class_dirs", "parent_labels"):
            value = getattr(self, key)
            if isinstance(value, list) and n is not None and len(value) != n:
                problems.append(f"{key}: {len(value)} entries for {n} classes")
        if isinstance(self.class_dirs, list) and len(set(self.class_dirs)) != len(self.class_dirs):
            problems.append("class_dirs: a folder is named twice")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def class_dir_list(self) -> list[str] | None:
        """The folder of each class, or None when folders are matched by class name."""
        if self.class_dirs == "index":
            return [str(i) for i in range(len(self.classnames))]
        return self.class_dirs


def resolve_parent(spec: DatasetSpecFile, parent: DatasetSpecFile) -> tuple[DatasetSpecFile, list[str]]:
    """``spec`` with the classes it takes from ``parent`` filled in, and every way the
    two disagree (one line each)."""
    if parent.parent is not None:
        return spec, [f"parent {parent.name!r} has a parent itself (one level only)"]
    n = len(parent.classnames)
    labels = spec.parent_labels if spec.parent_labels is not None else list(range(n))
    bad = [i for i in labels if not 0 <= i < n]
    if bad or len(set(labels)) != len(labels):
        return spec, [f"parent_labels: {bad[:3] or 'repeated labels'} (the parent {parent.name!r} has labels "
                      f"0..{n - 1}, each at most once)"]
    problems = []
    names = [parent.classnames[i] for i in labels]
    update = {}
    if spec.classnames is None:
        update["classnames"] = names
    else:
        wrong = [(k, c, names[k]) for k, c in enumerate(spec.classnames) if c != names[k]]
        if wrong:
            k, c, want = wrong[0]
            problems.append(f"classnames[{k}] is {c!r}, but {parent.name}'s label {labels[k]} is {want!r} "
                            f"({len(wrong)} such)")
    parent_dirs = parent.class_dir_list()
    if isinstance(parent_dirs, list):
        dirs = [parent_dirs[i] for i in labels]
        if spec.class_dirs is None:
            update["class_dirs"] = dirs
        elif isinstance(spec.class_dirs, list) and spec.class_dirs != dirs:
            k = next(k for k, (a, b) in enumerate(zip(spec.class_dirs, dirs)) if a != b)
            problems.append(f"class_dirs[{k}] is {spec.class_dirs[k]!r}, but {parent.name}'s label {labels[k]} "
                            f"is in {dirs[k]!r}")
    return spec.model_copy(update=update), problems


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
    """Generate an embedded dataset unless ``folder`` holds one from the current generator."""
    from ..embedded.tasks import write_task

    if embedded_ready(task, folder):
        return
    if folder.exists():
        log.warning("regenerating %s: made by another version of the generator", folder)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_task(task, folder)
    (folder / ".generator").write_text(embedded_fingerprint(task) + "\n")


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
    """The cheap checks (``vlprompt validate``, and before every run): the folders the
    layout needs, a split file that parses and agrees with the spec (labels, class
    names, every class present), class folders named as the spec's classes."""
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
                        check=lambda opts: check_spec_dataset(spec, opts))


def read_spec_files() -> tuple[list[DatasetEntry], list[str]]:
    """Every readable spec file as a dataset; problems with a file are returned, not raised."""
    specs: dict[str, tuple[DatasetSpecFile, Path]] = {}
    problems = []
    for d in spec_dirs():
        for path in sorted(d.glob("*.yaml")):
            try:
                spec = DatasetSpecFile.model_validate(yaml.safe_load(path.read_text()))
            except yaml.YAMLError as exc:
                problems.append(f"{path}: invalid YAML ({exc})".splitlines()[0])
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


# --------------------------------------------------------------- your own images


class DataInfo(BaseModel):
    """A small YAML beside a user's images (``dataset.yaml`` in the folder, or
    ``<file stem>.yaml`` beside a CSV/JSON): what the images are."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    classnames: list[str] | dict[str, str] | None = None
    templates: list[str] | None = Field(None, min_length=1)
    ensemble: list[str] | None = Field(None, min_length=1)

    _slots = field_validator("templates", "ensemble")(lambda cls, v: _templates_have_slot(v))
    _text = field_validator("classnames", mode="before")(lambda cls, v: _names_as_text(v))


def read_data_info(path: Path) -> DataInfo:
    """The YAML beside the data, if there is one."""
    if not path.is_file():
        return DataInfo()
    try:
        return DataInfo.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except ValidationError as exc:
        raise UserError(*[f"{path}: {'.'.join(map(str, e['loc'])) or '(top level)'}: "
                          f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
                          for e in exc.errors()]) from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, an impossible date, nesting too deep
        raise UserError(f"{path}: not a dataset description ({str(exc).strip() or type(exc).__name__})") from None


class CustomOptions(Options):
    """What a user's own dataset is: class list and prompts (here, or in a YAML beside the data)."""

    classnames: list[str] | dict[str, str] | None = Field(
        None, description="class names, index = label (default: sorted folder names / class values); or a "
        "mapping {folder or class value: class name}")
    templates: list[str] | None = Field(None, min_length=1, description="zero-shot template(s), with '{}'")
    ensemble: list[str] | None = Field(None, min_length=1, description="prompt ensemble (templates: ensemble)")

    _slots = field_validator("templates", "ensemble")(lambda cls, v: _templates_have_slot(v))
    _text = field_validator("classnames", mode="before")(lambda cls, v: _names_as_text(v))

    def resolved(self, info: DataInfo) -> dict:
        """Settings of the section, else of the YAML beside the data, else defaults."""
        return {
            "classnames": self.classnames if self.classnames is not None else info.classnames,
            "templates": self.templates or info.templates or list(DEFAULT_TEMPLATES),
            "ensemble": self.ensemble or info.ensemble,
        }


class FolderOptions(CustomOptions):
    """``dataset: {name: folder, path: DIR}``: class subfolders, optionally under train/val/test."""

    path: Path = Field(description="folder of class subfolders, or of train/, val/, test/ with class subfolders; "
                       "an optional dataset.yaml in it gives classnames, templates, ensemble, name")

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not expand_user(path).is_dir():
            raise ValueError(f"dataset folder not found: {path}")
        return expand_user(path)


class CsvOptions(CustomOptions):
    """``dataset: {name: csv, path: FILE}``: columns path, class and optionally split."""

    path: Path = Field(description="CSV with columns path, class, and optionally split (train/val/test); an "
                       "optional <stem>.yaml beside it gives classnames, templates, ensemble, name")
    image_root: Path | None = Field(None, description="folder the paths are relative to (default: the file's)")

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not expand_user(path).is_file():
            raise ValueError(f"CSV file not found: {path}")
        return expand_user(path)


class JsonOptions(CsvOptions):
    """``dataset: {name: json, path: FILE}``: a list of {path, class, split} or a benchmark split file."""

    path: Path = Field(description="JSON list of {path, class, split} (split optional), or a split file of "
                       "train/val/test lists of [path, label, class name]; an optional <stem>.yaml beside it "
                       "gives classnames, templates, ensemble, name")

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not expand_user(path).is_file():
            raise ValueError(f"JSON file not found: {path}")
        return expand_user(path)


def load_folder(o: FolderOptions) -> DatasetSplits:
    info = read_data_info(o.path / "dataset.yaml")
    return load_class_folders(info.name or o.path.name, o.path, **o.resolved(info))


def load_list(o: CsvOptions, loader) -> DatasetSplits:
    info = read_data_info(o.path.with_suffix(".yaml"))
    return loader(info.name or o.path.stem, o.path, o.image_root, **o.resolved(info))


def _check_by_loading(load):
    def check(opts) -> list[str]:
        try:
            load(opts)
        except UserError as exc:
            return exc.problems
        return []

    return check


@hookimpl
def vlprompt_datasets() -> list[DatasetEntry]:
    plugins, problems = read_spec_files()
    for p in problems:
        log.warning("skipping dataset spec %s", p)
    plugins.append(DatasetEntry("folder", FolderOptions, load_folder, "a folder of class subfolders (your own images)",
                                check=_check_by_loading(load_folder)))
    load_csv_ = lambda o: load_list(o, load_csv)  # noqa: E731
    plugins.append(DatasetEntry("csv", CsvOptions, load_csv_, "a CSV of path, class(, split) (your own images)",
                                check=_check_by_loading(load_csv_)))
    load_json_ = lambda o: load_list(o, load_json_list)  # noqa: E731
    plugins.append(DatasetEntry("json", JsonOptions, load_json_, "a JSON list of images, or a split file "
                                "(your own images)", check=_check_by_loading(load_json_)))
    return plugins

