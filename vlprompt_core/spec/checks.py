"""What comes after a spec validates: :func:`check_spec` (folders, plug-ins' own checks,
resolved method settings), :func:`resolve_methods` and :func:`method_labels`,
:func:`dataset_sections` and :func:`spec_hash`."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..api.entries import wrapped_fields
from ..datacheck import prompt_problems
from ..errors import UserError
from ..plugins import Registry
from ..recipes import backbone_info, resolve_method
from .classes import dataset_sections, unscored_classes
from .load import _os_problem
from .model import fixed_classes


def spec_hash(spec) -> str:
    """What a validated spec asks for, as a short hash: its output folder and its
    loggers (which say where results go, not what they are) left out, so enabling a
    logger neither sets earlier results aside nor re-runs a finished sweep run, and
    specs hash as they did before ``loggers`` existed."""
    dumped = spec.model_dump(mode="json", exclude={"output", "loggers"})
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def check_spec(spec, reg: Registry, source: str = "spec") -> None:
    """What can be checked before anything runs, beyond the spec's shape: the
    folders it writes, each backbone's and dataset's own ``check`` (model names,
    weight files, dataset folders and split files) and every method's resolved
    settings. Raises one :class:`UserError` with one line per problem."""
    problems: list[str] = []
    for where, folder in (("output", spec.output), ("train.feature_cache", spec.train.feature_cache)):
        if folder is not None and (wrong := folder_problem(Path(folder))):
            problems.append(f"{source}: {where}: {wrong}")
    backbone = reg.get("backbone", spec.backbone.name)
    if backbone.check is not None:
        problems += [f"{source}: {p}" for p in _checked(backbone.check, spec.backbone, "backbone")]
    for where, section in dataset_sections(spec, reg):
        entry = reg.get("dataset", section.name)
        if entry.check is not None:
            problems += [f"{source}: {where}: {p}" for p in _checked(entry.check, section, where)]
    methods = []
    info = backbone_info(spec, reg)
    try:
        methods = resolve_methods(spec, reg, info)
        problems += [f"{source}: {p}" for p in capability_problems(methods, reg, spec.backbone.name, info)]
        fixed = [(m, why) for m in methods
                 if (why := fixed_classes(reg.get("method", m.name), m.used if m.used is not None else m.options))]
        if reg.get("protocol", spec.protocol.name).unseen_classes:
            problems += [f"{source}: method {m.label!r} ({m.name}) cannot run {spec.protocol.name}, which scores "
                         f"classes it never saw: {why}" for m, why in fixed]
        elif fixed:
            problems += [f"{source}: method {m.label!r} ({m.name}) cannot score {target}; {why}"
                         for target in unscored_classes(spec, reg) for m, why in fixed]
    except UserError as exc:
        problems += [f"{source}: {p}" for p in exc.problems]
    if not problems:  # prompts against the text context, once the backbone and datasets check out
        problems += [f"{source}: {p}" for p in prompt_problems(reg, spec.backbone, dataset_sections(spec, reg), methods)]
    if problems:
        raise UserError(*problems)


def _checked(check, section, where: str) -> list[str]:
    """A plug-in's ``check`` of ``section``; a path the system refuses is one more problem."""
    try:
        return check(section)
    except OSError as exc:
        return [f"{where}: {_os_problem(exc)}"]


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a folder vlprompt writes in, or None: a file where the
    folder, or a folder above it, must be, a folder this user cannot write in (a
    read-only file system included), or a path the system refuses."""
    if "\0" in str(path):
        return f"{str(path)!r} is not a valid path (it holds a NUL character)"
    try:
        for above in (path, *path.parents):
            if above.exists():
                if above.is_dir():
                    if os.access(above, os.W_OK | os.X_OK):
                        return None
                    if above == path:
                        return f"{path} is not writable"
                    return f"{above} is not writable, so the folder {path} cannot be made in it"
                if above == path:
                    return f"{path} is a file, not a folder"
                return f"{above} is a file, so the folder {path} cannot be made in it"
    except OSError as exc:
        return _os_problem(exc)
    return None


def file_label(label: str) -> str:
    """A method label as it can appear in a file name."""
    return re.sub(r"[^A-Za-z0-9_.#+-]", "_", label)


def method_labels(spec) -> list[str]:
    """The name each method section has in the results: its ``label`` or its method
    name (joined with the wrapped method's, ``dept+kgcoop``, for a method that wraps
    another), with ``#2``, ``#3`` ... appended when a name repeats. Each section's name is
    its own: names that would pool two sections in one row (a label equal to the
    ``coop#2`` another section is given) or in one file (``a b`` and ``a_b``; ``A`` and
    ``a``, one name where file names ignore case) are a :class:`UserError`, a line each."""
    labels, numbered, seen = [], [], {}
    for m in spec.method:
        base = m.label or "+".join([m.name, *(getattr(m, f).name for f in wrapped_fields(type(m)))])
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
        numbered.append(seen[base] > 1)
    first: dict[str, int] = {}
    problems = []
    for i, label in enumerate(labels):
        j = first.setdefault(file_label(label).casefold(), i)
        if j == i:
            continue
        if label != labels[j]:
            why = f"is one file name with method[{j}]'s {labels[j]!r}"
        else:
            why = f"is method[{j}]'s as well"
            if numbered[i] or numbered[j]:
                base = label.rsplit("#", 1)[0]
                why += f" (a repeated {base!r} is named {base}#2, {base}#3, ...)"
        problems.append(f"method[{i}]: the label {label!r} {why}: give each method section a label of its own")
    if problems:
        raise UserError(*problems)
    return labels


def resolve_methods(spec, reg: Registry, backbone=None) -> list:
    """Every method section with its settings decided (spec > recipe > defaults) and
    settled on the backbone (``backbone``, a :class:`~vlprompt_core.api.BackboneInfo`;
    default: what the spec's backbone entry tells without loading weights); see
    :mod:`vlprompt_core.recipes`. The conflicts of every section are one
    :class:`UserError`, a line each."""
    backbone = backbone_info(spec, reg) if backbone is None else backbone
    methods, problems = [], []
    for label, section in zip(method_labels(spec), spec.method):
        try:
            methods.append(resolve_method(spec, section, label, reg.get("method", section.name), backbone))
        except UserError as exc:
            problems += exc.problems
    if problems:
        raise UserError(*problems)
    return methods


#: What a capability is, in words (as :meth:`~vlprompt_core.api.VisionLanguageBackbone.require` says it).
NEEDS = {"vision_transformer": "a ViT image tower (visual prompts go into its blocks)",
         "projection_hooks": "attention projections reachable in both towers (weights trained inside them)"}


def capability_problems(methods: list, reg: Registry, name: str, backbone) -> list[str]:
    """Capabilities the resolved ``methods`` require (:attr:`~vlprompt_core.api.PromptMethod.requires`)
    that the backbone (``name``) is known, without loading weights, to lack: one line each."""
    if backbone.capabilities is None:
        return []
    return [f"method {m.label!r} ({m.name}) needs {NEEDS.get(capability, capability)}; backbone "
            f"{backbone.family or name} has none"
            for m in methods for capability in getattr(reg.get("method", m.name).build, "requires", ())
            if capability not in backbone.capabilities]
