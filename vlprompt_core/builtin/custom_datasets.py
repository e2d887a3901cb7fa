"""Built-in datasets of a user's own images, no code needed: ``folder`` (a folder of
class subfolders, optionally under train/val/test), ``csv`` (columns path, class and
optionally split) and ``json`` (a list of images, or a benchmark split file). Their
options, the small YAML beside the data that may give the class list, prompts and
name (:class:`DataInfo`), and the loaders; the ``vlprompt_datasets`` hook that
registers them lives in :mod:`.datasets`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..api import DatasetSplits, Options
from ..data import dataset_problems, expand_user, load_class_folders
from ..errors import UserError
from ..yamlload import load as load_yaml, yaml_problem
from .spec_files import DEFAULT_TEMPLATES, _names_as_text, _templates_have_slot


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
        return DataInfo.model_validate(load_yaml(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: {yaml_problem(exc)}") from None
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
    """A dataset's ``check``: load it; what stops that, or what every dataset must be
    (:func:`~vlprompt_core.data.dataset_problems`: two classes or more, each with images)."""
    def check(opts) -> list[str]:
        try:
            return dataset_problems(load(opts))
        except UserError as exc:
            return exc.problems

    return check


def _classes_by_loading(load):
    """A dataset's ``classes``: those of the dataset loaded."""
    return lambda opts: load(opts).classes
