"""KgCoOp: "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization"
(Yao, Zhang, Xu, CVPR 2023).

CoOp's learned context (4 vectors from "a photo of a", class name at the end), trained
with cross-entropy plus a pull of every class's learned text feature towards the frozen
feature of its hand-written prompt: ``CE + lambda * (1 - mean_c cos(w_c, w_c^clip))``
(the official code's form; the paper writes the mean squared distance of the two unit
vectors, ``2 (1 - cos)``, available as ``kg_distance: squared``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
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
from vlprompt_core.prompting import (
    PromptTable,
    PromptTemplate,
    TemplateChoice,
    check_templates,
    class_text_features,
    init_context,
    templates_for,
)
from vlprompt_core.prompting.settle import settle_context
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits


class KgCoOpOptions(Options):
    """``method: {name: kgcoop, ...}`` (defaults: the official base-to-novel setting)."""

    n_ctx: int = Field(4, ge=1, description="number of context vectors M (ignored when ctx_init is set)")
    ctx_init: str = Field("a photo of a", description="initialise the context from these words (M = their token "
                          "count); '' for M random vectors")
    init_std: float = Field(0.02, gt=0, description="std of the random N(0, std^2) initialisation")
    kg_weight: float = Field(8.0, ge=0, description="lambda, the weight of the knowledge-guided term (0: CoOp)")
    kg_distance: Literal["cosine", "squared"] = Field(
        "cosine", description="the knowledge-guided term: 'cosine', 1 - mean cos (the official code), or 'squared', "
        "the mean squared distance of the unit features (the paper's formula, = 2 (1 - cos))")
    templates: TemplateChoice = Field(
        "dataset", description="the hand-written prompt(s) of the frozen features the context is pulled towards: "
        "'dataset', 'ensemble' or a list with '{}' (the recipe sets KgCoOp's own per-dataset template)")

    _has_slot = field_validator("templates")(check_templates)


def knowledge_distance(learned: torch.Tensor, frozen: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """The mean over classes of the distance between learned and frozen class text
    features ``[C, D]`` (normalised here): ``1 - cos`` or ``|a - b|^2`` of unit vectors."""
    a, b = F.normalize(learned.float(), dim=-1), F.normalize(frozen.float(), dim=-1)
    if kind == "squared":
        return (a - b).pow(2).sum(-1).mean()
    return 1.0 - (a * b).sum(-1).mean()


class KgCoOp(PromptMethod):
    inputs = ("image_features",)
    provides = ("features",)  # MethodOutput.extras: TEXT_FEATURES, IMAGE_FEATURES
    shards_classes = True  # one context for every image: a distributed run may shard the text pass over classes

    @classmethod
    def effective_options(cls, options, backbone):
        """``n_ctx`` as ``ctx_init`` makes it (one vector per token)."""
        return settle_context(options, backbone)

    def __init__(self, backbone, classes: ClassSet, options: KgCoOpOptions):
        super().__init__(backbone, classes, options)
        self.ctx = nn.Parameter(init_context(backbone, options.n_ctx, options.ctx_init, options.init_std))
        self.template = PromptTemplate.with_context(self.ctx.shape[0])
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.prompts = PromptTable(self.backbone, classes.names, self.template)
        prior = class_text_features(self.backbone, classes.names, templates_for(self.options.templates, classes))
        self.register_buffer("prior", prior, persistent=False)  # [C, D] unit, frozen

    def text_features(self) -> torch.Tensor:
        """``[C, D]`` class text features from the current context."""
        return self.prompts.encode(self.backbone, self.ctx)

    def forward(self, batch: Batch) -> MethodOutput:
        text = self.cached("text_features", self.text_features)  # static: once per evaluation
        logits = cosine_logits(batch.image_features.float(), text.float(), self.backbone.logit_scale)
        losses = {}
        if self.training and self.options.kg_weight > 0:
            distance = knowledge_distance(text, self.prior, self.options.kg_distance)
            losses["kg"] = self.options.kg_weight * distance
        return MethodOutput(logits, losses=losses, extras={TEXT_FEATURES: text, IMAGE_FEATURES: batch.image_features})


#: htyao89/KgCoOp ``KgCoOp/trainers/kgcoop.py`` CUSTOM_TEMPLATES where they differ from
#: the datasets' own (CoOp's) templates.
TEMPLATES = {"dtd": "a photo of a {}, a type of texture."}

#: The official recipe (htyao89/KgCoOp ``KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml``,
#: ``scripts/base2new_train.sh`` with ``scripts/run.sh``'s weight 8.0, ``scripts/xd_train.sh``):
#: SGD lr 0.002, batch 128, 100 epochs, cosine after one constant warm-up epoch at 1e-5;
#: 4 context vectors from "a photo of a", lambda 8. The same config for every protocol.
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.002, "batch_size": 128, "epochs": 100, "momentum": 0.9,
           "weight_decay": 5e-4, "warmup_epochs": 1, "warmup_lr": 1e-5},
    options={"ctx_init": "a photo of a", "kg_weight": 8.0},
    rules=[RecipeRule(when={"dataset": name}, options={"templates": [template]}) for name, template in TEMPLATES.items()],
    source="htyao89/KgCoOp KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml, KgCoOp/scripts/base2new_train.sh "
    "(W from KgCoOp/scripts/run.sh: 8.0), KgCoOp/scripts/xd_train.sh, KgCoOp/trainers/kgcoop.py CUSTOM_TEMPLATES",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("kgcoop", KgCoOpOptions, KgCoOp,
                        "KgCoOp: CoOp's context pulled towards the hand-written prompt's text features", RECIPE,
                        published=Published.load(__name__))]
