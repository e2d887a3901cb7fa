"""CLIP-Adapter: "CLIP-Adapter: Better Vision-Language Models with Feature Adapters"
(Gao, Geng, Zhang, Ma, Fang, Zhang, Li, Qiao; IJCV 2023, arXiv 2110.04544).

Nothing in the prompt is learned. A two-layer bottleneck MLP without biases, a ReLU
after each layer, reads the frozen image feature ``f`` (the image tower's output,
before normalisation); its output is blended back into it,

    f' = alpha * relu(W2 relu(W1 f)) + (1 - alpha) * f        (W1: [D/r, D], W2: [D, D/r])

and ``f'`` is scored against the frozen text features of the dataset's hand-written
prompt with CLIP's scaled cosine; cross-entropy trains W1 and W2. alpha = 0.2 and
r = 4, as the official code (gaopengcuhk/CLIP-Adapter ``clip_adapter.py``) fixes them.
The classifier comes from the class names, so any classes can be scored (novel ones
included); only the image side is adapted.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import (
    IMAGE_FEATURES,
    TEXT_FEATURES,
    Batch,
    ClassSet,
    EffectiveOptions,
    MethodEntry,
    MethodOutput,
    Options,
    PromptMethod,
    Published,
)
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import TemplateChoice, check_templates, class_text_features, templates_for
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits


class ClipAdapterOptions(Options):
    """``method: {name: clip_adapter, ...}`` (defaults: the official code's constants)."""

    ratio: float = Field(0.2, ge=0, le=1, description="alpha, the residual ratio: the adapted feature is alpha * "
                         "adapter(f) + (1 - alpha) * f (0: zero-shot CLIP; the official code: 0.2)")
    reduction: int = Field(4, ge=1, description="r, the bottleneck's reduction: embed_dim // r hidden units "
                           "(the official code: 4, 256 of RN50's 1024)")
    templates: TemplateChoice = Field(
        "dataset", description="the hand-written prompt(s) of the frozen classifier: 'dataset' (its own template, "
        "the official CUSTOM_TEMPLATES), 'ensemble' or a list with '{}'")

    _has_slot = field_validator("templates")(check_templates)


def _hidden_problem(reduction: int, dim: int | None) -> str | None:
    if dim is not None and dim // reduction < 1:
        return (f"method.reduction: {reduction} leaves no hidden unit on the backbone's {dim}-wide image feature "
                f"(embed_dim // reduction); use at most {dim}")
    return None


class Adapter(nn.Module):
    """The bottleneck MLP ``relu(W2 relu(W1 x))``, no biases. Parameter names follow the
    official module (``fc.0.weight`` ``[D/r, D]``, ``fc.2.weight`` ``[D, D/r]``), so its
    weights load as they are."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = dim // reduction
        self.fc = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                nn.Linear(hidden, dim, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def blend(features: torch.Tensor, adapted: torch.Tensor, ratio: float) -> torch.Tensor:
    """``ratio * adapted + (1 - ratio) * features``: the residual mix, before normalisation."""
    return ratio * adapted + (1.0 - ratio) * features


class ClipAdapter(PromptMethod):
    inputs = ("image_features",)  # the image tower is frozen: its features of the augmented images
    provides = ("features",)  # MethodOutput.extras: TEXT_FEATURES (the classifier), IMAGE_FEATURES (adapted)

    @classmethod
    def effective_options(cls, options, backbone):
        """Refuses a reduction that leaves the bottleneck no unit on this backbone."""
        problem = _hidden_problem(options.reduction, backbone.embed_dim)
        if problem:
            raise UserError(problem)
        return EffectiveOptions(options)

    def __init__(self, backbone, classes: ClassSet, options: ClipAdapterOptions):
        super().__init__(backbone, classes, options)
        problem = _hidden_problem(options.reduction, backbone.embed_dim)
        if problem:
            raise UserError(problem)
        self.adapter = Adapter(backbone.embed_dim, options.reduction)  # torch's default Linear initialisation
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        weights = class_text_features(self.backbone, classes.names, templates_for(self.options.templates, classes))
        self.register_buffer("classifier", weights, persistent=False)  # [C, D] unit, frozen, from the names

    def adapt(self, image_features: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` frozen image features -> the blended features (not normalised)."""
        features = image_features.float()
        return blend(features, self.adapter(features), self.options.ratio)

    def forward(self, batch: Batch) -> MethodOutput:
        image = self.adapt(batch.image_features)
        logits = cosine_logits(image, self.classifier.to(image.dtype), self.backbone.logit_scale)
        return MethodOutput(logits, extras={TEXT_FEATURES: self.classifier, IMAGE_FEATURES: image})


#: gaopengcuhk/CLIP-Adapter ships no configs or scripts: its README says to put
#: ``clip_adapter.py`` under CoOp's ``trainers/`` and run CoOp's command. CoOp's
#: configs (KaiyangZhou/CoOp ``configs/trainers/CoOp/rn50*.yaml``, the epochs per shot
#: count of its README): SGD lr 0.002, batch 32, cosine after one constant warm-up
#: epoch at 1e-5; 200 epochs at 8-16 shots, 100 at 2-4, 50 at 1 shot and on ImageNet.
#: The templates are the datasets' own (CUSTOM_TEMPLATES equals them), so no rule sets one.
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.002, "batch_size": 32, "epochs": 200, "momentum": 0.9,
           "weight_decay": 5e-4, "warmup_epochs": 1, "warmup_lr": 1e-5},
    options={"ratio": 0.2, "reduction": 4},
    rules=[
        RecipeRule(when={"shots": 1}, train={"epochs": 50}),
        RecipeRule(when={"shots": [2, 4]}, train={"epochs": 100}),
        RecipeRule(when={"dataset": "imagenet"}, train={"epochs": 50}),
    ],
    source="gaopengcuhk/CLIP-Adapter clip_adapter.py (alpha 0.2, reduction 4; commit 08d07f8) and its README "
    "(no configs: 'follow CoOp's command'); KaiyangZhou/CoOp configs/trainers/CoOp/rn50.yaml, rn50_ep100.yaml, "
    "rn50_ep50.yaml, scripts/coop/main.sh",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("clip_adapter", ClipAdapterOptions, ClipAdapter,
                        "CLIP-Adapter: a residual bottleneck MLP on the frozen image features, hand-written classifier",
                        RECIPE, published=Published.load(__name__))]
