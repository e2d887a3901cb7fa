"""Reading and validating a run spec: :func:`load_spec` (:func:`read_yaml`, then
:func:`validate_spec`), the limits a spec file must keep to, and each problem as one
line with its path (:func:`error_message`)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import UserError
from ..plugins import Registry
from ..yamlload import load as load_yaml, yaml_problem
from .classes import unscored_classes
from .model import build_spec_model, fixed_classes


def _loc(error: dict, raw: Any) -> str:
    """``method.n_ctx`` from a pydantic loc, dropping the union tags it inserts."""
    parts, node = [], raw
    for part in error["loc"]:
        if isinstance(node, dict) and isinstance(part, str) and part not in node and node.get("name") == part:
            continue  # a discriminated-union tag, not a key
        if isinstance(node, dict) and isinstance(part, int) and part not in node:
            continue  # a single section the spec allows in place of a list
        index = isinstance(part, int) and not isinstance(node, dict)  # not a key that is a number
        parts.append(f"[{part}]" if index else f".{part}" if parts else str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    if error["type"] == "union_tag_invalid":
        parts.append(".name")
    return "".join(parts) or "(top level)"


def error_message(error: dict) -> str:
    """One pydantic error as the words after its path (``unknown key``, ``unknown name ...``)."""
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown name {ctx.get('tag')!r} (registered: {ctx.get('expected_tags')})"
    return error["msg"]


#: A run spec is a few kilobytes: a larger file is refused before it is parsed.
MAX_SPEC_BYTES = 1 << 20
#: Values (mappings, lists, scalars) a spec may hold, counted with YAML aliases
#: expanded: a few lines of nested aliases ("billion laughs") expand to billions.
MAX_SPEC_VALUES = 100_000
#: Nesting a spec may have (its sections are a few levels deep).
MAX_SPEC_DEPTH = 32


def _size_problem(data: Any) -> str | None:
    """Why ``data`` is too large to validate, or None. Counts values as validation
    sees them (a shared or self-containing alias once per place it appears), and
    stops at the limit."""
    pending, count = [(data, 0)], 0
    while pending:
        node, depth = pending.pop()
        count += 1
        if count > MAX_SPEC_VALUES:
            return f"more than {MAX_SPEC_VALUES:,} values (with YAML aliases expanded): not a run spec"
        if depth > MAX_SPEC_DEPTH:
            return f"nested more than {MAX_SPEC_DEPTH} levels deep: not a run spec"
        if isinstance(node, dict):
            pending += [(v, depth + 1) for item in node.items() for v in item]
        elif isinstance(node, (list, tuple, set)):
            pending += [(v, depth + 1) for v in node]
    return None


def validate_spec(data: Any, reg: Registry, source: str = "spec", notes: list[str] | None = None):
    """Validate plain data; a :class:`UserError` lists one line per problem. What
    ``method: all`` leaves out under this protocol is told in ``notes`` (one line each)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the spec must be a mapping of sections (backbone, method, dataset, ...)")
    too_large = _size_problem(data)
    if too_large:
        raise UserError(f"{source}: {too_large}")
    model = build_spec_model(reg)
    try:
        spec = model.model_validate(data)
        if data.get("method") == "all":
            spec = _leave_out_unscorable(spec, reg, notes if notes is not None else [])
        return spec
    except ValidationError as exc:
        raise UserError(*[f"{source}: {_loc(e, data)}: {error_message(e)}" for e in exc.errors()]) from None
    except OSError as exc:  # a validator looked at a path the system refuses (name too long, ...)
        raise UserError(f"{source}: {_os_problem(exc)}") from None


def _leave_out_unscorable(spec, reg: Registry, notes: list[str]):
    """``method: all`` without the methods that score only the classes they were fitted on,
    where the run scores others: under a protocol of unseen classes (base-to-novel), and
    under a transfer protocol whose targets hold classes the trained-on dataset does not
    (:func:`~.classes.unscored_classes`). Each one left out is said in ``notes``."""
    fixed = {id(s): why for s in spec.method if (why := fixed_classes(reg.get("method", s.name), s))}
    if not fixed:
        return spec
    protocol = spec.protocol.name
    if reg.get("protocol", protocol).unseen_classes:
        where = ""
    else:
        unscored = unscored_classes(spec, reg)
        if not unscored:
            return spec
        where = f"{unscored[0]}; "
    keep = []
    for section in spec.method:
        if id(section) in fixed:
            notes.append(f"method: all leaves out {section.name} under {protocol}: {where}{fixed[id(section)]}")
        else:
            keep.append(section)
    return spec.model_copy(update={"method": keep})


def _os_problem(exc: OSError) -> str:
    """One line for an error of the file system, naming the path."""
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


def _read_text(path: Path) -> str:
    """The text of a spec file; anything but a small UTF-8 text file is a :class:`UserError`."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{path}: a folder, not a spec file")
        if not stat.S_ISREG(mode):
            raise UserError(f"{path}: not a regular file")
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: spec file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the spec file ({exc.strerror or exc})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise UserError(f"{path}: larger than {MAX_SPEC_BYTES >> 20} MiB: not a run spec (a few kilobytes of YAML)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file (no UTF-8 at byte {exc.start}): a run spec is YAML") from None


def read_yaml(path: Path, empty: str) -> Any:
    """The data of a small YAML file (a run or sweep spec); ``empty`` says what the
    file should hold when it holds nothing.

    Whatever the file holds, the outcome is its data or a :class:`UserError`: a
    folder, a binary or huge file, invalid or too deeply nested YAML, a key given twice
    in one mapping (:func:`~vlprompt_core.yamlload.load`), tags that construct Python
    objects (refused by ``safe_load``) and alias bombs included."""
    path = Path(path)
    text = _read_text(path)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: {yaml_problem(exc)}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML (nested too deeply): not a run spec") from None
    except (ValueError, OverflowError) as exc:  # a scalar no Python value holds: 2001-02-30, a 5,000-digit number
        raise UserError(f"{path}: invalid YAML value ({str(exc).strip() or type(exc).__name__})") from None
    if data is None:
        raise UserError(f"{path}: the file is empty ({empty})")
    return data


def load_spec(path: Path, reg: Registry, notes: list[str] | None = None):
    """Read and validate a YAML run spec (``notes``: see :func:`validate_spec`); ``output``
    defaults to ``runs/<file stem>``."""
    data = read_yaml(path, "a run spec is a mapping of sections: backbone, method, dataset, protocol, train, output")
    spec = validate_spec(data, reg, str(path), notes)
    if spec.output is None:
        spec.output = Path("runs") / Path(path).stem
    return spec
