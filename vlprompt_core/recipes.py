"""Method recipes: how a method's authors trained it, as data.

A :class:`Recipe` holds training settings (any field of the spec's ``train``
section) and option defaults, plus :class:`RecipeRule` s that apply only under
some protocols, datasets or shot counts (e.g. CoOp's epochs per shot count,
BPL's Monte-Carlo samples per dataset). Rules apply in order; a later match
overrides an earlier one.

Resolution, per method section of a run spec (:func:`resolve_method`): what the
user wrote in the spec wins (the method's own ``train:`` overrides, then the
top-level ``train:`` section, then the section's options); what they left out
comes from the method's recipe; the rest from the global defaults (the
:class:`~vlprompt_core.spec.TrainSpec` and options-model defaults).

A plug-in may keep its recipe in a YAML file beside its code and load it with
:meth:`Recipe.from_yaml`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError


class RecipeCondition(BaseModel):
    """When a rule applies: every given key must match (a value or a list of values)."""

    model_config = ConfigDict(extra="forbid")

    protocol: str | list[str] | None = Field(None, description="protocol name(s), e.g. few_shot")
    dataset: str | list[str] | None = Field(None, description="dataset name(s) trained on, e.g. imagenet")
    shots: int | list[int] | None = Field(None, description="shots per class of the protocol")

    def matches(self, context: dict[str, Any]) -> bool:
        for key in ("protocol", "dataset", "shots"):
            want = getattr(self, key)
            if want is None:
                continue
            values = want if isinstance(want, list) else [want]
            if context.get(key) not in values:
                return False
        return True


class RecipeRule(BaseModel):
    """Settings and option defaults that apply when :attr:`when` matches."""

    model_config = ConfigDict(extra="forbid")

    when: RecipeCondition
    train: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    note: str = ""


class Recipe(BaseModel):
    """A method's training recipe: ``train`` settings and ``options`` defaults,
    refined by ``rules``; ``source`` says where the values come from (e.g. the
    official config files)."""

    model_config = ConfigDict(extra="forbid")

    train: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    rules: list[RecipeRule] = Field(default_factory=list)
    source: str = ""

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})

    def for_context(self, context: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``(train, options)`` defaults this recipe gives under ``context``
        (keys ``protocol``, ``dataset``, ``shots``)."""
        train, options = dict(self.train), dict(self.options)
        for rule in self.rules:
            if rule.when.matches(context):
                train.update(rule.train)
                options.update(rule.options)
        return train, options


def check_recipe(recipe: Recipe, options_model: type[BaseModel], method: str) -> None:
    """Raise a clear error when a recipe names a train field or option that does not exist."""
    from .spec import TrainOverride

    parts = [("train", recipe.train, "options", recipe.options)]
    parts += [(f"rules[{i}].train", r.train, f"rules[{i}].options", r.options) for i, r in enumerate(recipe.rules)]
    problems = []
    for train_where, train, opt_where, options in parts:
        unknown = set(train) - set(TrainOverride.model_fields)
        if unknown:
            problems.append(f"recipe of method {method!r}: {train_where} has unknown field(s) {sorted(unknown)}")
        unknown = set(options) - set(options_model.model_fields)
        if unknown:
            problems.append(f"recipe of method {method!r}: {opt_where} has unknown option(s) {sorted(unknown)}")
    if problems:
        raise UserError(*problems)


@dataclass
class ResolvedMethod:
    """One method section of a run spec with every setting decided.

    ``sources`` tells, for each train field and option, where its value came from:
    ``"spec"``, ``"recipe"`` or ``"default"``. ``key`` identifies what the
    (method, seed) results depend on: two sections with the same key give the
    same results, so a finished one is never trained again.
    """

    label: str
    name: str
    options: Any  # the method's validated options model
    train: Any  # a TrainSpec
    sources: dict[str, str] = field(default_factory=dict)
    key: str = ""

    def describe(self) -> dict[str, Any]:
        """Plain data for ``results.json``."""
        return {
            "name": self.name,
            "key": self.key,
            "options": self.options.model_dump(mode="json", exclude={"name", "label", "train"}),
            "train": self.train.model_dump(mode="json"),
            "sources": self.sources,
        }


def run_context(spec) -> dict[str, Any]:
    """What recipe rules look at: protocol, dataset trained on, shots."""
    return {
        "protocol": spec.protocol.name,
        "dataset": spec.dataset.name,
        "shots": getattr(spec.protocol, "shots", None),
    }


#: Train fields that do not change what a (method, seed) pair computes.
_NOT_IN_KEY = {"seeds", "device", "num_workers", "eval_batch_size", "unreadable_images", "kernels",
               "text_chunk", "feature_cache", "checkpoint_every"}
#: Train fields in the key only when they differ from their default (newer fields:
#: results keyed before they existed stay valid).
_IN_KEY_WHEN_SET = {"augment_views": 0}


def resolve_method(spec, section, label: str, entry) -> ResolvedMethod:
    """Decide every train setting and option of one method section (spec > recipe > default)."""
    from .spec import TrainSpec

    recipe_train, recipe_options = (entry.recipe.for_context(run_context(spec)) if entry.recipe else ({}, {}))

    # train: defaults < recipe < top-level spec < the section's own overrides
    user_train = spec.train.model_dump(include=spec.train.model_fields_set)
    own = section.train.model_dump(include=section.train.model_fields_set) if section.train is not None else {}
    own = {k: v for k, v in own.items() if v is not None}
    merged = {**recipe_train, **user_train, **own}
    try:
        train = TrainSpec.model_validate(merged)
    except ValidationError as exc:
        raise UserError(*[f"method {label!r}: train.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                          for e in exc.errors()]) from None
    sources = {}
    for name in TrainSpec.model_fields:
        sources[f"train.{name}"] = (
            "spec" if name in own or name in user_train else "recipe" if name in recipe_train else "default"
        )

    # options: defaults < recipe < what the section says
    reserved = {"name", "label", "train"}
    user_options = section.model_dump(include=section.model_fields_set - reserved)
    applied = {k: v for k, v in recipe_options.items() if k not in user_options}
    if applied:
        try:
            options = type(section).model_validate({**section.model_dump(include=section.model_fields_set),
                                                    **applied})
        except ValidationError as exc:
            why = ", ".join(f"{k}={v!r}" for k, v in applied.items())
            raise UserError(*[f"method {label!r}: {e['msg']} (with the recipe's {why}; write the option in the "
                              "spec to override it)" for e in exc.errors()]) from None
    else:
        options = section
    for name in entry.options.model_fields:
        sources[name] = "spec" if name in user_options else "recipe" if name in applied else "default"

    resolved = ResolvedMethod(label, section.name, options, train, sources)
    resolved.key = method_key(spec, resolved)
    return resolved


def method_key(spec, resolved: ResolvedMethod) -> str:
    """A short hash of everything a (method, seed) result depends on except the seed."""
    payload = {
        "method": resolved.name,
        "options": resolved.options.model_dump(mode="json", exclude={"name", "label", "train"}),
        "train": resolved.train.model_dump(mode="json", exclude=_NOT_IN_KEY | {
            name for name, default in _IN_KEY_WHEN_SET.items() if getattr(resolved.train, name) == default}),
        "backbone": spec.backbone.model_dump(mode="json"),
        "dataset": spec.dataset.model_dump(mode="json"),
        "protocol": spec.protocol.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
