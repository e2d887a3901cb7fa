"""The spec model, built from the registry: :func:`build_spec_model` makes each
section a union of the registered plug-ins' options models, told apart by ``name``."""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from ..api import DatasetRef
from ..errors import UserError
from ..plugins import Registry
from ..settings import Folder, TrainOverride, TrainSpec


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


def all_methods(reg: Registry) -> list[str]:
    """What ``method: all`` names: the built-in baselines first, then installed plug-ins
    (the core names no method), not the methods that wrap another (they need a ``base``
    of the user's choice)."""
    return sorted((n for n in reg.names("method") if not reg.get("method", n).wraps),
                  key=lambda n: (reg.sources[("method", n)].distribution != "vlprompt", n))


def fixed_classes(entry, options) -> str | None:
    """Why the method of ``entry`` with ``options`` scores only the classes it was fitted
    on (:meth:`~vlprompt_core.api.PromptMethod.fixed_classes`), or None."""
    hook = getattr(entry.build, "fixed_classes", None)
    return hook(options) if hook is not None else None


def _method_list(reg: Registry):
    """``method:`` may be one section, a list, or ``all`` (:func:`all_methods`)."""
    names = all_methods(reg)

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


#: Spec models already built, by what they are built from (:func:`_model_key`), newest last.
_BUILT: dict[tuple, type[BaseModel]] = {}


def _model_key(reg: Registry) -> tuple:
    """What :func:`build_spec_model` reads of ``reg``: each entry's name, options model,
    description, whether it wraps a method, and the distribution it comes from."""
    return tuple(
        (kind, name, entry.options, getattr(entry, "description", ""), getattr(entry, "wraps", None),
         getattr(reg.sources.get((kind, name)), "distribution", None))
        for kind in sorted(reg.entries) for name, entry in sorted(reg.entries[kind].items()))


def build_spec_model(reg: Registry) -> type[BaseModel]:
    """The pydantic model of a run spec for what ``reg`` holds (made once for the same
    plug-ins: pydantic builds a model's validators when it is made)."""
    key = _model_key(reg)
    if key not in _BUILT:
        if len(_BUILT) >= 16:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = _make_spec_model(reg)
    return _BUILT[key]


def _make_spec_model(reg: Registry) -> type[BaseModel]:
    backbone = _union(_section_models(reg, "backbone"), "backbone")
    method = _union(
        _section_models(reg, "method", {
            "label": (Optional[str], Field(None, description="name in the results (default: the method name; "
                                                    "dept+kgcoop for a method wrapping another)")),
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
        output=(Optional[Folder], Field(None, description="results folder (default: runs/<spec file name>)")),
        loggers=(
            _logger_list(reg),
            Field(default_factory=list, description="loggers enabled for the run, each {name: <a registered "
                  "logger>, ...its options} (see `vlprompt list`); they never change results"),
        ),
    )
