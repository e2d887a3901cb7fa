"""A method's training recipe as data: :class:`Recipe`, refined by :class:`RecipeRule` s
that apply when their :class:`RecipeCondition` matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..yamlload import load as load_yaml
from .base import MATCHED_PROPERTIES


# -------------------------------------------------------------------------- recipe
# How a method's authors trained it, as data (resolved against a run spec by
# :mod:`vlprompt_core.recipes`, which plug-ins import these names from).


def same_family(name: Any) -> Any:
    """``ViT-B/16`` (papers) and ``ViT-B-16`` (open_clip) name the same architecture."""
    return name.replace("/", "-").casefold() if isinstance(name, str) else name


class RecipeCondition(BaseModel):
    """When a rule applies: every given key must match (a value or a list of values).

    Besides the run (protocol, dataset, shots), a rule may match what the backbone is
    (:class:`~vlprompt_core.api.BackboneInfo`): its ``family`` (spelt either way,
    ``ViT-B/16`` or ``ViT-B-16``), and the depth and width of each tower."""

    model_config = ConfigDict(extra="forbid")

    protocol: str | list[str] | None = Field(None, description="protocol name(s), e.g. few_shot")
    dataset: str | list[str] | None = Field(None, description="dataset name(s) trained on, e.g. imagenet")
    shots: int | list[int] | None = Field(None, description="shots per class of the protocol")
    family: str | list[str] | None = Field(None, description="backbone architecture(s), e.g. ViT-B/16")
    text_depth: int | list[int] | None = Field(None, description="blocks of the text tower")
    text_width: int | list[int] | None = Field(None, description="width of the text tower")
    vision_depth: int | list[int] | None = Field(None, description="blocks of the image tower")
    vision_width: int | list[int] | None = Field(None, description="width of the image tower")

    def matches(self, context: dict[str, Any]) -> bool:
        for key in ("protocol", "dataset", "shots", *MATCHED_PROPERTIES):
            want = getattr(self, key)
            if want is None:
                continue
            values = want if isinstance(want, list) else [want]
            if key == "family":
                if same_family(context.get(key)) not in [same_family(v) for v in values]:
                    return False
            elif context.get(key) not in values:
                return False
        return True

    def unknown(self, context: dict[str, Any]) -> list[str]:
        """The backbone properties this condition names that ``context`` cannot tell (None)."""
        return [key for key in MATCHED_PROPERTIES if getattr(self, key) is not None and context.get(key) is None]


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
        (keys ``protocol``, ``dataset``, ``shots`` and the backbone properties
        :data:`~vlprompt_core.api.base.MATCHED_PROPERTIES`)."""
        train, options = dict(self.train), dict(self.options)
        for rule in self.rules:
            if rule.when.matches(context):
                train.update(rule.train)
                options.update(rule.options)
        return train, options
