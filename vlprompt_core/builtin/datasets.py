"""Built-in datasets: one per file in ``datasets_spec/``, plus ``folder``, ``csv`` and
``json`` for a user's own images (no code needed).

This module registers them all (the ``vlprompt_datasets`` hook, once); what they are
lives beside it: the spec-file format in :mod:`.spec_files` (:class:`DatasetSpecFile`),
the benchmarks the spec files describe in :mod:`.spec_datasets` (reading, checking and
loading a dataset as its spec lays it out, embedded tasks), and a user's own images in
:mod:`.custom_datasets` (their options, the YAML beside the data, the loaders). Their
names are re-exported here.
"""

from __future__ import annotations

import logging

from .. import hookimpl
from ..api import DatasetEntry
from ..data import load_csv, load_json_list
from .custom_datasets import (
    CsvOptions,
    CustomOptions,
    DataInfo,
    FolderOptions,
    JsonOptions,
    _check_by_loading,
    _classes_by_loading,
    load_folder,
    load_list,
    read_data_info,
)
from .spec_datasets import (
    VAL_FOLDER_FIX,
    SpecDatasetOptions,
    check_spec_dataset,
    coverage_problems,
    embedded_fingerprint,
    embedded_ready,
    ensure_embedded,
    load_spec_dataset,
    read_spec_files,
    scan_spec,
    spec_classes,
    spec_where,
)
from .spec_files import DEFAULT_TEMPLATES, DatasetSpecFile, Split, resolve_parent, spec_dirs

__all__ = [
    "vlprompt_datasets",
    # spec_files
    "DEFAULT_TEMPLATES",
    "DatasetSpecFile",
    "Split",
    "resolve_parent",
    "spec_dirs",
    # spec_datasets
    "VAL_FOLDER_FIX",
    "SpecDatasetOptions",
    "check_spec_dataset",
    "coverage_problems",
    "embedded_fingerprint",
    "embedded_ready",
    "ensure_embedded",
    "load_spec_dataset",
    "read_spec_files",
    "scan_spec",
    "spec_classes",
    "spec_where",
    # custom_datasets
    "CsvOptions",
    "CustomOptions",
    "DataInfo",
    "FolderOptions",
    "JsonOptions",
    "load_folder",
    "load_list",
    "read_data_info",
]

log = logging.getLogger(__name__)


@hookimpl
def vlprompt_datasets() -> list[DatasetEntry]:
    plugins, problems = read_spec_files()
    for p in problems:
        log.warning("skipping dataset spec %s", p)
    plugins.append(DatasetEntry("folder", FolderOptions, load_folder, "a folder of class subfolders (your own images)",
                                check=_check_by_loading(load_folder), classes=_classes_by_loading(load_folder)))
    load_csv_ = lambda o: load_list(o, load_csv)  # noqa: E731
    plugins.append(DatasetEntry("csv", CsvOptions, load_csv_, "a CSV of path, class(, split) (your own images)",
                                check=_check_by_loading(load_csv_), classes=_classes_by_loading(load_csv_)))
    load_json_ = lambda o: load_list(o, load_json_list)  # noqa: E731
    plugins.append(DatasetEntry("json", JsonOptions, load_json_, "a JSON list of images, or a split file "
                                "(your own images)", check=_check_by_loading(load_json_),
                                classes=_classes_by_loading(load_json_)))
    return plugins

