"""The run spec: one YAML file, validated by pydantic.

The spec model is built from the registry: each section (backbone, method,
dataset, protocol) is a union of the registered plug-ins' own options models,
told apart by ``name``. So ``vlprompt schema`` covers every installed plug-in and
a typo in ``method.n_ctx`` is reported with its path.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, field_validator

from .api import DatasetRef
from .errors import UserError
from .plugins import Registry


class TrainSpec(BaseModel):
    """How prompts are trained: the ``train:`` section. Its defaults (the CoOp
    reference recipe) apply to what neither the spec nor a method's recipe sets."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=0, description="training epochs (0: evaluate only)")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.002, gt=0)
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(1, ge=0, description="epochs at warmup_lr before the schedule starts")
    warmup_lr: float = Field(1e-5, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast dtype; trainable parameters stay fp32. auto: bf16 on CUDA, fp32 on CPU"
    )
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="area range of the random resized crop (reference: 0.08-1)"
    )
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    num_workers: int = Field(0, ge=0, description="data-loading worker processes")
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
        if isinstance(value, int) and value < 0:
            raise ValueError("needs a number of prompts >= 1, 0 (one pass) or 'auto'")
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
        if name not in ("seeds", "device", "num_workers", "kernels", "unreadable_images", "feature_cache")
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
    )


def _loc(error: dict, raw: Any) -> str:
    """``method.n_ctx`` from a pydantic loc, dropping the union tags it inserts."""
    parts, node = [], raw
    for part in error["loc"]:
        if isinstance(node, dict) and isinstance(part, str) and part not in node and node.get("name") == part:
            continue  # a discriminated-union tag, not a key
        if isinstance(node, dict) and isinstance(part, int):
            continue  # a single section the spec allows in place of a list
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}" if parts else str(part))
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    if error["type"] == "union_tag_invalid":
        parts.append(".name")
    return "".join(parts) or "(top level)"


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown name {ctx.get('tag')!r} (registered: {ctx.get('expected_tags')})"
    return error["msg"]


def validate_spec(data: Any, reg: Registry, source: str = "spec"):
    """Validate plain data; a :class:`UserError` lists one line per problem."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the spec must be a mapping of sections (backbone, method, dataset, ...)")
    model = build_spec_model(reg)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(*[f"{source}: {_loc(e, data)}: {_message(e)}" for e in exc.errors()]) from None


def load_spec(path: Path, reg: Registry):
    """Read and validate a YAML run spec; ``output`` defaults to ``runs/<file stem>``."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: spec file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{path}: {where}invalid YAML ({getattr(exc, 'problem', exc)})") from None
    spec = validate_spec(data, reg, str(path))
    if spec.output is None:
        spec.output = Path("runs") / Path(path).stem
    return spec


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
    """What can be checked before anything runs, beyond the spec's shape: each
    backbone's and dataset's own ``check`` (model names, weight files, dataset
    folders and split files) and every method's resolved settings. Raises one
    :class:`UserError` with one line per problem."""
    problems: list[str] = []
    backbone = reg.get("backbone", spec.backbone.name)
    if backbone.check is not None:
        problems += [f"{source}: {p}" for p in backbone.check(spec.backbone)]
    for where, section in dataset_sections(spec, reg):
        entry = reg.get("dataset", section.name)
        if entry.check is not None:
            problems += [f"{source}: {where}: {p}" for p in entry.check(section)]
    try:
        resolve_methods(spec, reg)
    except UserError as exc:
        problems += [f"{source}: {p}" for p in exc.problems]
    if problems:
        raise UserError(*problems)


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
