"""What plug-ins implement and return: the public contract of vlprompt.

Reading order for a method author: :class:`Options`, :class:`PromptMethod` (with
:class:`Batch` and :class:`MethodOutput`), :class:`MethodEntry` and
:class:`Recipe`. The backbone interface a method may use is
:class:`VisionLanguageBackbone`; the shared text-prompt machinery is in
:mod:`vlprompt_core.prompting`.

Import every name from here (``from vlprompt_core.api import ...``); the
submodules only say where each part is written:

* :mod:`~vlprompt_core.api.base`: :class:`Options` (the base of every options
  model), :class:`ContractError` and :class:`BackboneInfo` (what a backbone is,
  told without loading weights).
* :mod:`~vlprompt_core.api.data`: :class:`Item`, :class:`ClassSet`,
  :class:`DatasetSplits`, :class:`EvalSet` and a protocol's :class:`Plan`.
* :mod:`~vlprompt_core.api.backbone`: :class:`VisionLanguageBackbone` with
  :data:`BlockHook` (:class:`ContextHook`, :class:`BlockContext`, :func:`call_block_hook`),
  :data:`TextPrefix` and :data:`ProjectionHook` (:class:`ProjectionSite`).
* :mod:`~vlprompt_core.api.method`: :class:`PromptMethod`, :class:`Batch`,
  :class:`MethodOutput`, :class:`ParamGroup`, :class:`EffectiveOptions`, and
  :class:`FrozenData` (:class:`FrozenFeatures`) for fitting without gradient steps.
* :mod:`~vlprompt_core.api.recipe`: :class:`Recipe`, :class:`RecipeRule` and
  :class:`RecipeCondition`.
* :mod:`~vlprompt_core.api.entries`: what the registration hooks return
  (:class:`BackboneEntry`, :class:`MethodEntry`, :class:`DatasetEntry`,
  :class:`ProtocolEntry`, :class:`LoggerEntry`), :class:`Published`,
  :class:`ProtocolContext` and :class:`DatasetRef`.

The package imports nothing of vlprompt_core but leaf modules
(:mod:`~vlprompt_core.errors`, :mod:`~vlprompt_core.textbook`); its submodules import
each other directly, never this ``__init__`` (``tests/test_layers.py``).
"""

from __future__ import annotations

from .backbone import (
    BlockContext,
    BlockHook,
    ContextHook,
    ProjectionHook,
    ProjectionSite,
    TextPrefix,
    VisionLanguageBackbone,
    call_block_hook,
)
from .base import BackboneInfo, ContractError, Options
from .data import ClassSet, DatasetSplits, EvalSet, Item, Plan
from .entries import (
    BackboneEntry,
    DatasetEntry,
    DatasetRef,
    LoggerEntry,
    MethodEntry,
    MethodRef,
    ProtocolContext,
    ProtocolEntry,
    Published,
)
from .method import (
    IMAGE_FEATURES,
    INPUTS,
    TEXT_FEATURES,
    Batch,
    EffectiveOptions,
    FrozenData,
    FrozenFeatures,
    MethodOutput,
    ParamGroup,
    PromptMethod,
)
from .recipe import Recipe, RecipeCondition, RecipeRule

__all__ = [
    # base
    "Options",
    "ContractError",
    "BackboneInfo",
    # data
    "Item",
    "ClassSet",
    "DatasetSplits",
    "EvalSet",
    "Plan",
    # backbone
    "BlockHook",
    "BlockContext",
    "ContextHook",
    "call_block_hook",
    "TextPrefix",
    "ProjectionSite",
    "ProjectionHook",
    "VisionLanguageBackbone",
    # method
    "Batch",
    "MethodOutput",
    "ParamGroup",
    "EffectiveOptions",
    "FrozenData",
    "FrozenFeatures",
    "INPUTS",
    "PromptMethod",
    # recipe
    "RecipeCondition",
    "RecipeRule",
    "Recipe",
    # registrations
    "BackboneEntry",
    "Published",
    "MethodEntry",
    "DatasetEntry",
    "ProtocolContext",
    "ProtocolEntry",
    "LoggerEntry",
    "DatasetRef",
    "MethodRef",
    "TEXT_FEATURES",
    "IMAGE_FEATURES",
]
