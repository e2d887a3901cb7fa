"""CoOp: "Learning to Prompt for Vision-Language Models" (Zhou et al., IJCV 2022).

M learned context vectors in the token-embedding space replace the words of a
hand-written prompt around the class name; the whole backbone stays frozen and
the only loss is cross-entropy over ``scale * cos(image, text)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import (
    IMAGE_FEATURES,
    TEXT_FEATURES,
    Batch,
    ClassSet,
    MethodEntry,
    MethodOutput,
    Options,
    PromptMethod,
    Published,
)
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import PromptTable, PromptTemplate, init_context
from vlprompt_core.prompting.settle import settle_context
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits


class CoOpOptions(Options):
    """``method: {name: coop, ...}`` (defaults: the reference ``N_CTX=16``, random init)."""

    n_ctx: int = Field(16, ge=1, description="number of context vectors M (ignored when ctx_init is set)")
    ctx_init: str = Field(
        "", description="initialise the context from these words, e.g. 'a photo of a' (M = their token count)"
    )
    class_token_position: Literal["end", "middle", "front"] = Field(
        "end", description="where the class name goes relative to the context"
    )
    csc: bool = Field(False, description="class-specific context: one context per class (random init only)")
    init_std: float = Field(0.02, gt=0, description="std of the random N(0, std^2) initialisation")

    @model_validator(mode="after")
    def _csc_needs_random_init(self):
        if self.csc and self.ctx_init:
            raise ValueError("csc applies to random initialisation only; drop ctx_init or csc")
        return self


CSC_FIXED = ("method.csc: class-specific context is tied to the classes it was trained on; it cannot score other "
             "classes (use csc: false for base-to-novel or transfer)")


class CoOp(PromptMethod):
    inputs = ("image_features",)
    provides = ("features",)  # MethodOutput.extras: TEXT_FEATURES, IMAGE_FEATURES
    shards_classes = True  # one context for every image: a distributed run may shard the text pass over classes

    @classmethod
    def effective_options(cls, options, backbone):
        """``n_ctx`` as ``ctx_init`` makes it (one vector per token); an ``n_ctx`` the words contradict is refused."""
        return settle_context(options, backbone)

    def __init__(self, backbone, classes: ClassSet, options: CoOpOptions):
        super().__init__(backbone, classes, options)
        per_class = len(classes) if options.csc else None
        self.ctx = nn.Parameter(init_context(backbone, options.n_ctx, options.ctx_init, options.init_std, per_class))
        self.n_ctx = self.ctx.shape[-2]
        self.template = PromptTemplate.with_context(self.n_ctx, options.class_token_position)
        self._trained_names = list(classes.names)
        self.set_classes(classes)

    @classmethod
    def fixed_classes(cls, options: CoOpOptions) -> str | None:
        return CSC_FIXED if options.csc else None

    def set_classes(self, classes: ClassSet) -> None:
        if self.options.csc and list(classes.names) != self._trained_names:
            raise UserError(CSC_FIXED)
        self.prompts = PromptTable(self.backbone, classes.names, self.template)

    def text_features(self) -> torch.Tensor:
        """``[C, D]`` class text features from the current context."""
        return self.prompts.encode(self.backbone, self.ctx)

    def forward(self, batch: Batch) -> MethodOutput:
        text = self.cached("text_features", self.text_features)  # static: once per evaluation
        logits = cosine_logits(batch.image_features.float(), text.float(), self.backbone.logit_scale)
        return MethodOutput(logits, extras={TEXT_FEATURES: text, IMAGE_FEATURES: batch.image_features})


#: The official recipe (KaiyangZhou/CoOp ``configs/trainers/CoOp/*.yaml``, ``scripts/coop/main.sh``):
#: SGD lr 0.002, batch 32; epochs by shots (1: 50, 2-4: 100, 8-16: 200); ImageNet 50.
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.002, "batch_size": 32, "epochs": 200, "weight_decay": 5e-4,
           "warmup_epochs": 1, "warmup_lr": 1e-5},
    rules=[
        RecipeRule(when={"shots": 1}, train={"epochs": 50}),
        RecipeRule(when={"shots": [2, 4]}, train={"epochs": 100}),
        RecipeRule(when={"dataset": "imagenet"}, train={"epochs": 50}),
    ],
    source="KaiyangZhou/CoOp configs/trainers/CoOp (rn50/vit_b16 ep50/ep100/ep200), scripts/coop/main.sh",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("coop", CoOpOptions, CoOp, "CoOp: learned context vectors in the text prompt", RECIPE,
                        published=Published.load(__name__))]
