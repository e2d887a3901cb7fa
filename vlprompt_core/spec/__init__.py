"""The run spec: one YAML file, validated by pydantic.

The spec model is built from the registry: each section (backbone, method,
dataset, protocol, and each of the optional ``loggers``) is a union of the
registered plug-ins' own options models, told apart by ``name``. So
``vlprompt schema`` covers every installed plug-in and
a typo in ``method.n_ctx`` is reported with its path.

It lives in three modules, all of it importable from here:

* :mod:`~vlprompt_core.spec.model` — the spec model built from the registry
  (:func:`build_spec_model`).
* :mod:`~vlprompt_core.spec.load` — reading and validating a spec file
  (:func:`load_spec`, :func:`read_yaml`, :func:`validate_spec`, :func:`error_message`,
  the ``MAX_SPEC_*`` limits).
* :mod:`~vlprompt_core.spec.checks` — after validation: :func:`check_spec`,
  :func:`resolve_methods`, :func:`method_labels`, :func:`dataset_sections`,
  :func:`folder_problem`, :func:`spec_hash`.

The ``train:`` section's models (:class:`TrainSpec`, :class:`TrainOverride`) are
defined in :mod:`vlprompt_core.settings` and imported from here too.
"""

from __future__ import annotations

from ..settings import TrainOverride, TrainSpec
from .checks import check_spec, folder_problem, method_labels, resolve_methods, spec_hash
from .classes import dataset_sections, unscored_classes
from .load import (
    MAX_SPEC_BYTES,
    MAX_SPEC_DEPTH,
    MAX_SPEC_VALUES,
    error_message,
    load_spec,
    read_yaml,
    validate_spec,
)
from .model import build_spec_model

__all__ = [
    "MAX_SPEC_BYTES",
    "MAX_SPEC_DEPTH",
    "MAX_SPEC_VALUES",
    "TrainOverride",
    "TrainSpec",
    "build_spec_model",
    "check_spec",
    "dataset_sections",
    "unscored_classes",
    "error_message",
    "folder_problem",
    "load_spec",
    "method_labels",
    "read_yaml",
    "resolve_methods",
    "spec_hash",
    "validate_spec",
]
