"""CLIP-LoRA: "Low-Rank Few-Shot Adaptation of Vision-Language Models" (Zanella, Ben Ayed,
CVPR Workshops 2024).

Low-rank updates of the attention projections of both CLIP towers: at every chosen
projection ``W`` (query, key and value by default) of the chosen blocks, the output
``W x + b`` becomes ``W x + b + s * B A dropout(x)`` with ``A`` ``[r, in]`` (Kaiming-uniform,
as ``nn.Linear``), ``B`` ``[out, r]`` (zeros, so training starts at zero-shot CLIP) and
``s = alpha / sqrt(r)`` (the official code's scaling). The classifier is the text features
of ``"a photo of a {class}."`` computed through the adapted text tower, so novel classes are
scored the same way; the image features come from the adapted image tower; logits are
the scaled cosine, the loss cross-entropy. The frozen weights are never written: the
``A`` and ``B`` tensors reach the towers through the backbone's projection hooks
(:meth:`~vlprompt_core.api.VisionLanguageBackbone.adapted`).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import (
    Batch,
    ClassSet,
    EffectiveOptions,
    MethodEntry,
    MethodOutput,
    Options,
    ProjectionSite,
    PromptMethod,
)
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import class_text_features
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits

#: Named block sets (``position``), for any depth; on 12 blocks they are the official
#: ``INDEX_POSITIONS_TEXT`` / ``INDEX_POSITIONS_VISION`` lists (on 24, half-up / half-bottom / all).
PRESETS = ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top1", "top2", "top3")
Preset = Literal["all", "bottom", "mid", "up", "half-bottom", "half-up", "top1", "top2", "top3"]
#: ``params`` names (the official ones) -> the backbone's projection names.
PROJECTION = {"q": "q", "k": "k", "v": "v", "o": "out"}


class CLIPLoRAOptions(Options):
    """``method: {name: clip_lora, ...}`` (defaults: the official setting, MaxZanella/CLIP-LoRA
    ``run_utils.py``)."""

    encoder: Literal["both", "text", "vision"] = Field(
        "both", description="the towers that get LoRA: both, text or vision (the other stays frozen)")
    position: Union[Preset, list[int]] = Field(
        "all", description="the blocks that get LoRA in each adapted tower: all, bottom, mid, up (thirds), "
        "half-bottom, half-up, top1, top2, top3, or a list of block indices (0-based)")
    params: list[Literal["q", "k", "v", "o"]] = Field(
        ["q", "k", "v"], min_length=1, description="the attention projections that get LoRA: q, k, v, o (output)")
    r: int = Field(2, ge=1, le=4096, description="the rank of the low-rank update")
    alpha: float = Field(1.0, gt=0, description="LoRA's alpha: the update is scaled by alpha / sqrt(r) (or / r)")
    rank_scaling: Literal["sqrt", "linear"] = Field(
        "sqrt", description="the scale of the update: 'sqrt', alpha / sqrt(r) (the official code), or 'linear', "
        "alpha / r (the LoRA paper's)")
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout on the input of each low-rank branch (training)")
    prompt: str = Field("a photo of a {}.", description="the prompt whose adapted text features are the classifier "
                        "('{}': the class name)")
    logit_scale: Optional[float] = Field(
        None, gt=0, description="the logits' temperature; None: the backbone's (100 for OpenAI CLIP, the official "
        "code's constant)")

    @field_validator("params")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a projection more than once")
        return value

    @field_validator("position")
    @classmethod
    def _blocks(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("needs at least one block")
            if min(value) < 0 or len(set(value)) != len(value):
                raise ValueError("needs distinct block indices >= 0")
        return value

    @field_validator("prompt")
    @classmethod
    def _slot(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError("needs exactly one '{}' where the class name goes")
        return value


def blocks(position, depth: int) -> list[int]:
    """The blocks ``position`` names in a tower of ``depth`` blocks (a preset, or a list)."""
    if not isinstance(position, str):
        return sorted(position)
    spans = {
        "all": (0, depth), "bottom": (0, depth // 3), "mid": (depth // 3, 2 * depth // 3),
        "up": (2 * depth // 3, depth), "half-bottom": (0, depth // 2), "half-up": (depth // 2, depth),
        "top1": (depth - 1, depth), "top2": (depth - 2, depth), "top3": (depth - 3, depth),
    }
    low, high = spans[position]
    return list(range(max(low, 0), high))


def _official(position, depth: int) -> bool:
    """Whether the official code has this preset for a tower of this depth (so no note)."""
    return isinstance(position, list) or position == "all" or depth == 12 or (
        depth == 24 and position in ("half-bottom", "half-up"))


def adapted_towers(encoder: str) -> tuple[str, ...]:
    return {"both": ("text", "image"), "text": ("text",), "vision": ("image",)}[encoder]


def settle(options: CLIPLoRAOptions, depths: dict[str, Optional[int]]) -> tuple[str, ...]:
    """Check ``position`` against the depths of the adapted towers (None: unknown); notes
    saying which blocks a preset picks where the official code has no such list."""
    notes, problems = [], []
    for tower in adapted_towers(options.encoder):
        depth = depths.get(tower)
        if depth is None:
            continue
        chosen = blocks(options.position, depth)
        where = f"the {depth}-block {tower} tower"
        if isinstance(options.position, list):
            beyond = [b for b in chosen if b >= depth]
            if beyond:
                problems.append(f"method.position: block{'s' * (len(beyond) > 1)} {', '.join(map(str, beyond))} "
                                f"beyond {where} (blocks 0-{depth - 1})")
        elif not chosen:
            problems.append(f"method.position: {options.position!r} selects no block of {where}; "
                            "name blocks as a list, e.g. [0, 1]")
        elif not _official(options.position, depth):
            notes.append(f"position {options.position!r} on {where}: blocks {chosen}")
    if problems:
        raise UserError(*problems)
    return tuple(notes)


class CLIPLoRA(PromptMethod):
    inputs = ("images",)
    #: every attention projection of both towers reachable (``backbone.adapted``)
    requires = ("projection_hooks",)

    @classmethod
    def effective_options(cls, options, backbone):
        return EffectiveOptions(options, settle(options, {"text": backbone.text_depth,
                                                          "image": backbone.vision_depth}))

    def __init__(self, backbone, classes: ClassSet, options: CLIPLoRAOptions):
        super().__init__(backbone, classes, options)
        backbone.require("projection_hooks", "method clip_lora")  # also when built outside the engine
        depths = {"text": backbone.text_depth, "image": backbone.vision_depth}
        settle(options, depths)
        widths = {"text": backbone.text_width, "image": backbone.vision_width}
        self.scaling = options.alpha / (math.sqrt(options.r) if options.rank_scaling == "sqrt" else options.r)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.sites: dict[ProjectionSite, str] = {}
        for tower in adapted_towers(options.encoder):
            for layer in blocks(options.position, depths[tower]):
                for param in options.params:
                    site = ProjectionSite(tower, layer, PROJECTION[param])
                    name = f"{tower}_{layer}_{site.projection}"
                    a = torch.empty(options.r, widths[tower])
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear's weight
                    self.lora_A[name] = nn.Parameter(a)
                    self.lora_B[name] = nn.Parameter(torch.zeros(widths[tower], options.r))
                    self.sites[site] = name
        self.adapts = set(adapted_towers(options.encoder))
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        names = list(classes.names)
        device = self.backbone.positional_embedding.device
        self.register_buffer("tokens", self.backbone.tokenize([self.options.prompt.format(n) for n in names])
                             .to(device), persistent=False)
        if "text" not in self.adapts:  # the frozen classifier, once (the official clip_classifier)
            with torch.no_grad():
                frozen = class_text_features(self.backbone, names, [self.options.prompt])
            self.register_buffer("frozen_text", frozen, persistent=False)

    # ------------------------------------------------------------------ LoRA
    def lora_input(self, site: ProjectionSite, x: torch.Tensor) -> torch.Tensor:
        """What the low-rank branch at ``site`` reads: ``x`` after dropout (training only)."""
        p = self.options.dropout
        return F.dropout(x, p, training=True) if self.training and p > 0 else x

    def hook(self, site: ProjectionSite, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The backbone's projection hook: ``y + s * B A dropout(x)`` where LoRA sits, else ``y``."""
        name = self.sites.get(site)
        if name is None:
            return y
        a, b = self.lora_A[name], self.lora_B[name]
        h = self.lora_input(site, x)
        return y + (h @ a.to(h.dtype).T) @ b.to(h.dtype).T * self.scaling

    # -------------------------------------------------------------- features
    def class_features(self) -> torch.Tensor:
        """``[C, D]`` class features of the prompt through the adapted text tower (not normalised).
        (Not named ``text_features``: the scores are not the frozen image features' cosine to them.)"""
        if "text" not in self.adapts:
            return self.frozen_text
        with self.backbone.adapted(self.hook):
            return self.backbone.encode_text(self.tokens)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` image features through the adapted image tower (not normalised)."""
        if "image" not in self.adapts:
            with torch.no_grad():
                return self.backbone.encode_image(images)
        with self.backbone.adapted(self.hook):
            return self.backbone.encode_image(images)

    def forward(self, batch: Batch) -> MethodOutput:
        # the text tower runs first, then the image tower (the official order: same dropout draws)
        text = self.cached("class_features", self.class_features)  # static in eval: once per evaluation
        image = self.encode_images(batch.images)
        scale = self.options.logit_scale or self.backbone.logit_scale
        return MethodOutput(cosine_logits(image.float(), text.float(), scale))


SHOTS = (1, 2, 4, 8, 16)
#: ``n_iters`` of the official code: 500 x shots iterations (optimiser steps) at batch 32.
ITERATIONS_PER_SHOT = 500
BATCH = 32


def _budget_rules() -> list[RecipeRule]:
    """``train.steps`` = 500 x shots, the official loop's iterations, for each shot count of the benchmarks."""
    return [RecipeRule(when={"shots": shots}, train={"steps": ITERATIONS_PER_SHOT * shots},
                       note=f"{ITERATIONS_PER_SHOT} x {shots} iterations at batch {BATCH}") for shots in SHOTS]


#: The official recipe (MaxZanella/CLIP-LoRA ``run_utils.py`` defaults, ``lora.py``'s optimiser,
#: schedule and loop, ``main.py``'s training transform): AdamW, lr 2e-4, betas (0.9, 0.999),
#: weight decay 1e-2, cosine to 1e-6 stepped after every iteration over 500 x shots iterations
#: at batch 32 (``train.steps``), no warm-up; random resized
#: crops of scale 0.08-1 and flips.
RECIPE = Recipe(
    train={"optimizer": "adamw", "lr": 2e-4, "weight_decay": 1e-2, "adam_eps": 1e-8, "batch_size": BATCH,
           "warmup_epochs": 0, "schedule": "cosine", "schedule_per": "step", "min_lr": 1e-6,
           "crop_scale": (0.08, 1.0)},
    rules=_budget_rules(),
    source="MaxZanella/CLIP-LoRA run_utils.py (lr 2e-4, batch size 32, n_iters 500, r 2, alpha 1, dropout 0.25, "
    "q k v, both encoders, all blocks), lora.py (AdamW betas (0.9, 0.999) weight decay 1e-2, CosineAnnealingLR "
    "per iteration to 1e-6 over n_iters * shots iterations), main.py (RandomResizedCrop 0.08-1, flip)",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("clip_lora", CLIPLoRAOptions, CLIPLoRA,
                        "CLIP-LoRA: low-rank updates of the attention projections of both towers", RECIPE)]
