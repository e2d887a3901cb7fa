"""The dataset sections of a spec (:func:`dataset_sections`) and the transfer targets
whose classes the trained-on dataset does not hold (:func:`unscored_classes`): what a
method that scores only the classes it was fitted on cannot score."""

from __future__ import annotations

import typing
from typing import Any

from ..api import DatasetRef
from ..errors import UserError
from ..plugins import Registry


def dataset_sections(spec, reg: Registry) -> list[tuple[str, Any]]:
    """``(path, section)`` of every dataset section in ``spec``: the trained-on
    dataset and each protocol option typed ``list[DatasetRef]`` (transfer targets)."""
    out = [("dataset", spec.dataset)]
    options = reg.get("protocol", spec.protocol.name).options
    for fname, field in options.model_fields.items():
        if typing.get_args(field.annotation) == (DatasetRef,):
            out += [(f"protocol.{fname}[{i}]", s) for i, s in enumerate(getattr(spec.protocol, fname))]
    return out


def _class_names(reg: Registry, section) -> list[str] | None:
    """The class names of a dataset section, as its entry tells them (None when it
    cannot: no ``classes``, or its check says why)."""
    entry = reg.get("dataset", section.name)
    try:
        return list(entry.classes(section).names) if entry.classes is not None else None
    except (UserError, OSError):
        return None


def unscored_classes(spec, reg: Registry) -> list[str]:
    """One phrase for each transfer target (:func:`dataset_sections` after the first)
    with class names the trained-on dataset does not have, e.g. ``protocol.targets[0]
    (caltech101): 97 of its 100 classes are not among imagenet's ('accordion', 'airplanes',
    'anchor', ...)``. A dataset that cannot tell its classes before it loads is left out
    (its check, or the run, says what is wrong)."""
    sections = dataset_sections(spec, reg)
    trained = _class_names(reg, spec.dataset)
    if trained is None or len(sections) < 2:
        return []
    known, out = set(trained), []
    for where, section in sections[1:]:
        names = _class_names(reg, section)
        unknown = list(dict.fromkeys(n for n in names or () if n not in known))
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
            out.append(f"{where} ({section.name}): {len(unknown)} of its {len(names)} classes are not among "
                       f"{spec.dataset.name}'s ({shown})")
    return out
