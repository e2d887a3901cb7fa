"""A method's training recipe as data: :class:`Recipe`, refined by :class:`RecipeRule` s
that apply when their :class:`RecipeCondition` matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..yamlload import load as load_yaml


# -------------------------------------------------------------------------- recipe
# How a method's authors trained it, as data (resolved against a run spec by
# :mod:`vlprompt_core.recipes`, which plug-ins import these names from).


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
        return cls.model_validate(load_yaml(Path(path).read_text()) or {})

    def for_context(self, context: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``(train, options)`` defaults this recipe gives under ``context``
        (keys ``protocol``, ``dataset``, ``shots``)."""
        train, options = dict(self.train), dict(self.options)
        for rule in self.rules:
            if rule.when.matches(context):
                train.update(rule.train)
                options.update(rule.options)
        return train, options
