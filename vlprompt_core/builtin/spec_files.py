"""The dataset spec file: the format of a ``datasets_spec/*.yaml`` file
(:class:`DatasetSpecFile`), a spec taking its classes from a parent spec
(:func:`resolve_parent`), and the folders spec files are read from (:func:`spec_dirs`).

A spec file says everything vlprompt needs to know about a benchmark: canonical class
names (index = label), the zero-shot template(s) and prompt ensemble the literature
uses for it, the on-disk layout, the published split sizes, and, for humans, where the
images and split files come from and what is odd about it. The checks of class lists
and templates here serve a user's own datasets too (:mod:`.custom_datasets`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
