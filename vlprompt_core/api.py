"""What plug-ins implement and return: the public contract of vlprompt.

Reading order for a method author: :class:`Options`, :class:`PromptMethod`,
:class:`MethodPlugin`. The backbone interface a method may use is
:class:`VisionLanguageBackbone`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class Options(BaseModel):
    """Base of every plug-in's options model: unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Item:
    """One labelled image on disk."""

    path: Path
    label: int


@dataclass(frozen=True)
class ClassSet:
    """The classes a classifier is built for: canonical names and prompt templates."""

    names: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class DatasetSplits:
    """A loaded dataset: canonical classes (index = label) and its splits."""

    name: str
    classes: ClassSet
    train: list[Item]
    val: list[Item]
    test: list[Item]


@dataclass
class EvalSet:
    """A split scored under its own classifier (e.g. the novel classes only)."""

    name: str
    items: list[Item]
    classes: ClassSet


@dataclass
class Plan:
    """What a protocol decided for one seed: what trains and what is scored."""

    train: list[Item]
    val: list[Item]
    classes: ClassSet
    evals: list[EvalSet]
    #: A JSON-able record of the sampled items, saved with the run.
    record: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------ backbone


class VisionLanguageBackbone(nn.Module):
    """A frozen CLIP-like model, seen through the parts prompt methods need.

    Text side: ``tokenize`` -> ``embed_tokens`` -> (edit embeddings) ->
    ``encode_text_embeddings``, which adds positions, runs the blocks (with an
    optional hook before each block), pools and projects. Vision side:
    ``embed_image`` -> (edit tokens) -> ``encode_image_tokens``. Widths and depths
    are attributes read from the model.
    """

    embed_dim: int
    text_width: int
    text_depth: int
    vision_width: int
    vision_depth: int
    context_length: int
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    #: ``logit_scale.exp()``, a plain float (frozen).
    logit_scale: float

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def tokenize_words(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        raise NotImplementedError

    sot_id: int
    eot_id: int

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    #: ``[context_length, text_width]`` text positional embedding.
    positional_embedding: torch.Tensor

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        block_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        add_positional: bool = True,
    ) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_image_tokens(
        self,
        tokens: torch.Tensor,
        block_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


# -------------------------------------------------------------------------- method


@dataclass
class MethodOutput:
    """What a method's forward returns: logits and any extra loss terms."""

    logits: torch.Tensor
    #: Extra losses, added to the cross-entropy by the engine (already weighted).
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


class PromptMethod(nn.Module):
    """A prompt-learning method: trainable prompts around a frozen backbone.

    Subclasses set :attr:`modality` and implement :meth:`set_classes` and
    :meth:`forward`. Parameters that require grad are exactly what the engine
    trains and checkpoints; the backbone is frozen before the method is built.
    """

    #: Which tower the method prompts. ``"text"``: the image tower is untouched,
    #: so the engine passes frozen image features instead of images (and may cache
    #: them). ``"vision"`` / ``"both"``: the method receives images.
    modality: ClassVar[Literal["text", "vision", "both"]] = "text"

    def __init__(self, backbone: VisionLanguageBackbone, classes: ClassSet, options: Options):
        super().__init__()
        self.backbone = backbone
        self.options = options

    def set_classes(self, classes: ClassSet) -> None:
        """Rebuild class-dependent state, e.g. to score novel classes."""
        raise NotImplementedError

    def forward(
        self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> MethodOutput:
        raise NotImplementedError


# ------------------------------------------------------------------- registrations


@dataclass(frozen=True)
class BackbonePlugin:
    name: str
    options: type[Options]
    build: Callable[[Any], VisionLanguageBackbone]
    description: str = ""


@dataclass(frozen=True)
class MethodPlugin:
    """A method: its options model and the module class built from them."""

    name: str
    options: type[Options]
    build: Callable[[VisionLanguageBackbone, ClassSet, Any], PromptMethod]
    description: str = ""


@dataclass(frozen=True)
class DatasetPlugin:
    name: str
    options: type[Options]
    load: Callable[[Any], DatasetSplits]
    description: str = ""


@dataclass
class ProtocolContext:
    """What a protocol gets to make its plan for one seed."""

    dataset: DatasetSplits
    seed: int
    #: Loads another dataset section of the spec (targets of transfer protocols).
    load_dataset: Callable[[Any], DatasetSplits]


@dataclass(frozen=True)
class ProtocolPlugin:
    """A protocol: plans what trains and what is scored, and summarises scores.

    ``summarize`` maps ``{eval set name: accuracy}`` to the headline metrics
    (e.g. Base, Novel, H), in display order.
    """

    name: str
    options: type[Options]
    plan: Callable[[Any, ProtocolContext], Plan]
    summarize: Callable[[Any, dict[str, float]], dict[str, float]]
    description: str = ""


class DatasetRef(dict):
    """Annotate a protocol option as ``list[DatasetRef]`` to take dataset sections.

    The run spec validates each entry like the top-level ``dataset`` section (any
    registered dataset with its own options), e.g. the targets of cross-dataset
    transfer; the protocol then receives validated sections.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        return handler.generate_schema(dict[str, Any])
