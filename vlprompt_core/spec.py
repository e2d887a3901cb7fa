"""The run spec: one YAML file, validated by pydantic.

The spec model is built from the registry: each section (backbone, method,
dataset, protocol, and each of the optional ``loggers``) is a union of the
registered plug-ins' own options models, told apart by ``name``. So
``vlprompt schema`` covers every installed plug-in and
a typo in ``method.n_ctx`` is reported with its path.
"""

from __future__ import annotations

import hashlib
import json
import stat
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import torch
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic_core import PydanticCustomError

from .api import DatasetRef
from .errors import UserError
from .plugins import Registry


class TrainSpec(BaseModel):
    """How prompts are trained: the ``train:`` section. Its defaults (the CoOp
    reference recipe) apply to what neither the spec nor a method's recipe sets.

    Numbers are bounded above where a larger value could only exhaust memory or
    never finish, and floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(10, ge=0, le=10_000, description="training epochs (0: evaluate only)")
    batch_size: int = Field(32, ge=1, le=65_536)
    eval_batch_size: int = Field(256, ge=1, le=65_536)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.002, gt=0)
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(1, ge=0, le=10_000, description="epochs at warmup_lr before the schedule starts")
    warmup_lr: float = Field(1e-5, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast dtype; trainable parameters stay fp32. auto: bf16 on CUDA, fp32 on CPU"
    )
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="area range of the random resized crop (reference: 0.08-1)"
    )
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(
        default_factory=lambda: [1, 2, 3], min_length=1, max_length=1000)
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    num_workers: int = Field(0, ge=0, le=256, description="data-loading worker processes")
    kernels: Literal["auto", "reference", "triton"] | None = Field(
        None, description="backend of the fused ops: 'triton' (CUDA), 'reference' (PyTorch) or 'auto'; "
        "default: $VLPROMPT_KERNELS, else auto")
    augment_views: int = Field(
        0, ge=0, le=1000, description="K > 0: an approximation for methods that read only frozen image features "
        "(CoOp, CoCoOp...): K augmented views of each training image go through the frozen image tower once, and "
        "every epoch samples one of them per image; 0: a fresh augmentation every step (exact)")
    text_chunk: Union[int, Literal["auto"]] = Field(
        "auto", description="prompts per text-tower pass, recomputed in the backward pass (bounded memory for "
        "many classes, same gradients); 0: one pass; auto: passes of about 1 GiB of activations")
    checkpoint_every: int = Field(
        0, ge=0, le=10**9, description="also save the training state every N steps, not only at the end of each "
        "epoch (a run stopped mid-epoch resumes there; exactly so with num_workers: 0)")
    feature_cache: Optional[Path] = Field(
        None, description="folder of frozen image features kept between runs (test splits and augmented views), "
        "keyed by backbone weights, images, transform and precision; share it between the runs of a sweep")
    unreadable_images: Literal["error", "skip"] = Field(
        "error", description="an image file that cannot be read: 'error' stops the run naming the file; "
        "'skip' leaves it out and counts it in results.json (unreadable_images)"
    )

    @field_validator("text_chunk")
    @classmethod
    def _chunk(cls, value):
        if isinstance(value, int) and not 0 <= value <= 1_000_000:
            raise ValueError("needs a number of prompts from 1 to 1,000,000, 0 (one pass) or 'auto'")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ValueError("needs 'auto', 'cpu', 'cuda', 'cuda:1' or another torch device name") from None
        return value

    @field_validator("crop_scale")
    @classmethod
    def _ordered_fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("needs 0 < low <= high <= 1")
        return value


#: Per-method overrides of the train section (every field optional).
TrainOverride = create_model(
    "TrainOverride",
    __config__=ConfigDict(extra="forbid"),
    **{
        name: (Optional[field.annotation], Field(None, description=field.description))
        for name, field in TrainSpec.model_fields.items()
        if name not in ("seeds", "device", "num_workers", "kernels", "unreadable_images", "feature_cache",
                        "checkpoint_every")
    },
)


def _section_models(
    reg: Registry, kind: str, extra_fields: dict[str, Any] | None = None, dataset=None
) -> list[type[BaseModel]]:
    """One model per registered plug-in of ``kind``: its options plus ``name``.

    ``dataset`` (the dataset-section union) types protocol options declared
    ``list[DatasetRef]``.
    """
    models = []
    for name in reg.names(kind):
        plugin = reg.get(kind, name)
        fields: dict[str, Any] = {"name": (Literal[name], Field(description=plugin.description))}
        fields.update(extra_fields or {})
        if dataset is not None:
            fields.update(_dataset_ref_fields(plugin.options, dataset))
        model = create_model(f"{kind.title()}_{name}", __base__=plugin.options, **fields)
        models.append(model)
    return models


def _union(models: list[type[BaseModel]], kind: str):
    if not models:
        raise UserError(f"no {kind} is registered: is vlprompt installed correctly?")
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator="name")]


def _dataset_ref_fields(options: type[BaseModel], dataset) -> dict[str, Any]:
    """Protocol options typed ``list[DatasetRef]`` take dataset sections."""
    return {
        fname: (list[dataset], Field(min_length=1, description=field.description))
        for fname, field in options.model_fields.items()
        if typing.get_args(field.annotation) == (DatasetRef,)
    }


def _method_list(reg: Registry):
    """``method:`` may be one section, a list, or ``all`` (the built-in baselines
    first, then installed plug-ins; the core names no method)."""
    names = sorted(reg.names("method"), key=lambda n: (reg.sources[("method", n)].distribution != "vlprompt", n))

    def expand(value):
        if value == "all":
            return [{"name": n} for n in names]
        return [value] if isinstance(value, dict) else value

    return expand


def _logger_list(reg: Registry):
    """The type of ``loggers:``: a list of logger sections, each validated against
    the options of the registered logger it names (a single section may stand for a
    list of one; empty or absent: no logger). An unknown name is one error naming
    the registered loggers, whatever their number; with none registered, only an
    empty list is accepted."""
    names = reg.names("logger")
    models = _section_models(reg, "logger")

    def known_name(value):
        if isinstance(value, dict) and "name" in value and value["name"] not in names:
            raise PydanticCustomError(
                "union_tag_invalid", "unknown logger {tag!r} (registered: {expected_tags})",
                {"discriminator": "'name'", "tag": str(value["name"]),
                 "expected_tags": ", ".join(repr(n) for n in names)})
        return value

    def none_registered(value):
        named = f"{value['name']!r} is unknown: " if isinstance(value, dict) and "name" in value else ""
        raise PydanticCustomError(
            "no_logger", "{named}no logger is registered (install a logger plug-in, see `vlprompt list`, "
            "or leave loggers empty)", {"named": named})

    if not models:
        item = Annotated[dict[str, Any], BeforeValidator(none_registered)]
    elif len(models) == 1:
        item = Annotated[models[0], BeforeValidator(known_name)]
    else:
        item = Annotated[Union[tuple(models)], Field(discriminator="name"), BeforeValidator(known_name)]

    def as_list(value):
        if value is None:
            return []
        return [value] if isinstance(value, dict) else value

    return Annotated[list[item], BeforeValidator(as_list)]


def build_spec_model(reg: Registry) -> type[BaseModel]:
    """The pydantic model of a run spec for what ``reg`` holds."""
    backbone = _union(_section_models(reg, "backbone"), "backbone")
    method = _union(
        _section_models(reg, "method", {
            "label": (Optional[str], Field(None, description="name in the results (default: the method name)")),
            "train": (Optional[TrainOverride], Field(None, description="overrides of the train section for this method")),
        }),
        "method",
    )
    dataset = _union(_section_models(reg, "dataset"), "dataset")
    protocol = _union(_section_models(reg, "protocol", dataset=dataset), "protocol")
    backbone_field = (
        Field(default_factory=lambda: {"name": "open_clip"}, validate_default=True,
              description="the frozen model (default: the embedded tiny CLIP)")
        if "open_clip" in reg.names("backbone")
        else Field(description="the frozen model")
    )
    return create_model(
        "RunSpec",
        __config__=ConfigDict(extra="forbid"),
        backbone=(backbone, backbone_field),
        method=(
            Annotated[list[method], BeforeValidator(_method_list(reg))],
            Field(min_length=1, description="one method, a list run side by side, or 'all' (every "
                  "installed method with its own recipe)"),
        ),
        dataset=(dataset, ...),
        protocol=(protocol, ...),
        train=(TrainSpec, Field(default_factory=TrainSpec)),
        output=(Optional[Path], Field(None, description="results folder (default: runs/<spec file name>)")),
        loggers=(
            _logger_list(reg),
            Field(default_factory=list, description="loggers enabled for the run, each {name: <a registered "
                  "logger>, ...its options} (see `vlprompt list`); they never change results"),
        ),
    )


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


def validate_spec(data: Any, reg: Registry, source: str = "spec"):
    """Validate plain data; a :class:`UserError` lists one line per problem."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the spec must be a mapping of sections (backbone, method, dataset, ...)")
    too_large = _size_problem(data)
    if too_large:
        raise UserError(f"{source}: {too_large}")
    model = build_spec_model(reg)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(*[f"{source}: {_loc(e, data)}: {error_message(e)}" for e in exc.errors()]) from None
    except OSError as exc:  # a validator looked at a path the system refuses (name too long, ...)
        raise UserError(f"{source}: {_os_problem(exc)}") from None


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


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: where, and what (``while parsing ..., expected ...``)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    what = ", ".join(filter(None, (getattr(exc, "context", None), getattr(exc, "problem", None))))
    return f"{where}invalid YAML ({what or str(exc).strip().splitlines()[0]})"


def read_yaml(path: Path, empty: str) -> Any:
    """The data of a small YAML file (a run or sweep spec); ``empty`` says what the
    file should hold when it holds nothing.

    Whatever the file holds, the outcome is its data or a :class:`UserError`: a
    folder, a binary or huge file, invalid or too deeply nested YAML, tags that
    construct Python objects (refused by ``safe_load``) and alias bombs included."""
    path = Path(path)
    text = _read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML (nested too deeply): not a run spec") from None
    except (ValueError, OverflowError) as exc:  # a scalar no Python value holds: 2001-02-30, a 5,000-digit number
        raise UserError(f"{path}: invalid YAML value ({str(exc).strip() or type(exc).__name__})") from None
    if data is None:
        raise UserError(f"{path}: the file is empty ({empty})")
    return data


def load_spec(path: Path, reg: Registry):
    """Read and validate a YAML run spec; ``output`` defaults to ``runs/<file stem>``."""
    data = read_yaml(path, "a run spec is a mapping of sections: backbone, method, dataset, protocol, train, output")
    spec = validate_spec(data, reg, str(path))
    if spec.output is None:
        spec.output = Path("runs") / Path(path).stem
    return spec


def spec_hash(spec) -> str:
    """What a validated spec asks for, as a short hash: its output folder and its
    loggers (which say where results go, not what they are) left out, so enabling a
    logger neither sets earlier results aside nor re-runs a finished sweep run, and
    specs hash as they did before ``loggers`` existed."""
    dumped = spec.model_dump(mode="json", exclude={"output", "loggers"})
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def dataset_sections(spec, reg: Registry) -> list[tuple[str, Any]]:
    """``(path, section)`` of every dataset section in ``spec``: the trained-on
    dataset and each protocol option typed ``list[DatasetRef]`` (transfer targets)."""
    out = [("dataset", spec.dataset)]
    options = reg.get("protocol", spec.protocol.name).options
    for fname, field in options.model_fields.items():
        if typing.get_args(field.annotation) == (DatasetRef,):
            out += [(f"protocol.{fname}[{i}]", s) for i, s in enumerate(getattr(spec.protocol, fname))]
    return out


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
    try:
        resolve_methods(spec, reg)
    except UserError as exc:
        problems += [f"{source}: {p}" for p in exc.problems]
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
    folder, or a folder above it, must be, or a path the system refuses."""
    if "\0" in str(path):
        return f"{str(path)!r} is not a valid path (it holds a NUL character)"
    try:
        for above in (path, *path.parents):
            if above.exists():
                if above.is_dir():
                    return None
                if above == path:
                    return f"{path} is a file, not a folder"
                return f"{above} is a file, so the folder {path} cannot be made in it"
    except OSError as exc:
        return _os_problem(exc)
    return None


def method_labels(spec) -> list[str]:
    """The name each method section has in the results: its ``label`` or its method
    name, with ``#2``, ``#3`` ... appended when a name repeats."""
    labels, seen = [], {}
    for m in spec.method:
        base = m.label or m.name
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return labels


def resolve_methods(spec, reg: Registry) -> list:
    """Every method section with its settings decided (spec > recipe > defaults);
    see :mod:`vlprompt_core.recipes`."""
    from .recipes import resolve_method

    return [
        resolve_method(spec, section, label, reg.get("method", section.name))
        for label, section in zip(method_labels(spec), spec.method)
    ]
