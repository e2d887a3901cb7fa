"""CoCoOp: "Conditional Prompt Learning for Vision-Language Models" (Zhou et al., CVPR 2022).

CoOp's context vectors plus a small Meta-Net that maps the (normalised) image
feature to a shift added to every context vector: each image gets its own
prompts. All (image, class) prompts of a batch go through the text tower
together (the tokens before the class name once per image, in passes bounded by
the run's ``train.text_chunk``), never in a loop over images.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import Batch, ClassSet, MethodEntry, MethodOutput, Options, PromptMethod, Published
from vlprompt_core.prompting import PromptTable, PromptTemplate, init_context
from vlprompt_core.prompting.settle import settle_context
from vlprompt_core.recipes import Recipe
from vlprompt_kernels import cosine_logits


class CoCoOpOptions(Options):
    """``method: {name: cocoop, ...}`` (defaults: the published ``vit_b16_c4_ep10_batch1_ctxv1`` config)."""

    n_ctx: int = Field(4, ge=1, description="number of context vectors M (ignored when ctx_init is set)")
    ctx_init: str = Field("a photo of a", description="initialise the context from these words ('' for random)")
    init_std: float = Field(0.02, gt=0, description="std of the random N(0, std^2) initialisation")
    meta_hidden: int | None = Field(
        None, ge=1, description="hidden width of the Meta-Net (default: image-feature width / 16, as published)"
    )


class CoCoOp(PromptMethod):
    inputs = ("image_features",)
    per_image_text = True  # the reference code loops over the images of a batch

    @classmethod
    def effective_options(cls, options, backbone):
        """``n_ctx`` as ``ctx_init`` makes it (one vector per token); an ``n_ctx`` the words contradict is refused."""
        return settle_context(options, backbone)

    def __init__(self, backbone, classes: ClassSet, options: CoCoOpOptions):
        super().__init__(backbone, classes, options)
        self.ctx = nn.Parameter(init_context(backbone, options.n_ctx, options.ctx_init, options.init_std))
        hidden = options.meta_hidden or max(backbone.embed_dim // 16, 1)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(backbone.embed_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, backbone.text_width)),
        ])).to(self.ctx.device)
        self.template = PromptTemplate.with_context(self.ctx.shape[0])
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.prompts = PromptTable(self.backbone, classes.names, self.template)

    def image_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-image context ``[B, M, width]``: the learned context plus the Meta-Net's
        shift of the normalised image feature, the same shift for every vector."""
        shift = self.meta_net(F.normalize(image_features.float(), dim=-1))
        return self.ctx[None] + shift[:, None]

    def forward(self, batch: Batch) -> MethodOutput:
        feats = F.normalize(batch.image_features.float(), dim=-1)
        ctx = self.image_context(feats)  # [B, M, W]
        text = self.prompts.encode(self.backbone, ctx[:, None])  # [B, C, D]
        return MethodOutput(cosine_logits(feats, text.float(), self.backbone.logit_scale))


#: KaiyangZhou/CoOp ``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml`` with the
#: Dassl defaults: SGD (momentum 0.9, weight decay 5e-4), lr 0.002, batch 1, 10 epochs, one
#: constant warm-up epoch at 1e-5, cosine; the same config for base-to-novel, cross-dataset
#: and domain generalisation (``scripts/cocoop/*.sh``).
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.002, "batch_size": 1, "epochs": 10, "weight_decay": 5e-4,
           "momentum": 0.9, "warmup_epochs": 1, "warmup_lr": 1e-5},
    source="KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml, scripts/cocoop",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("cocoop", CoCoOpOptions, CoCoOp,
                        "CoCoOp: context shifted per image by a Meta-Net of the image feature", RECIPE,
                        published=Published.load(__name__))]
