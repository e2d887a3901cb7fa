"""DePT: "DePT: Decoupled Prompt Tuning" (Zhang, Zhou, Xu, Wang, Jiang; CVPR 2024).

A method that wraps another (``method: {name: dept, base: {name: kgcoop}}``): the wrapped
method's prompts train as they would alone, and DePT's channel-adjusted transfer (CAT)
head learns from the same features. Both feature sets are first rescaled per channel
(``x * scale + shift``, one pair for text and one for images, from 1 and 0), then one
linear classifier over the base classes is trained on the images *and* on the text
feature of each image's class: ``CE([W t_y; W x], [y; y])``. The loss gives the head
weight ``w`` of the wrapped method's cross-entropy::

    loss = base.loss - w * CE(similarity logits) + w * CE(head)        (w = 0.7)

(for a base whose loss is ``CE + terms``, as CoOp's and KgCoOp's: ``(1 - w) CE + w
CE(head) + terms``, the official form). On the classes it was trained on the scores are
``(1 - w) * similarity + w * head``; on any other class set (novel classes, transfer
targets) only the wrapped method's similarity logits: the head knows only its classes.

The wrapped method must provide ``"features"`` (its text and image features, see
``PromptMethod.provides``); the core builds it from its own plug-in and hands it here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import (
    IMAGE_FEATURES,
    TEXT_FEATURES,
    Batch,
    ClassSet,
    MethodEntry,
    MethodOutput,
    MethodRef,
    Options,
    ParamGroup,
    PromptMethod,
)
from vlprompt_core.recipes import Recipe


class DePTOptions(Options):
    """``method: {name: dept, base: {name: <method>, ...its options}, ...}``."""

    base: MethodRef = Field(description="the wrapped method, a method section {name: <method>, ...its options}; "
                            "it must provide its text and image features (coop, kgcoop)")
    head_weight: float = Field(0.7, ge=0, le=1, description="w: the CAT head's share of the loss and, on the "
                               "trained classes, of the scores ((1 - w) similarity + w head)")
    head_lr_scale: float = Field(6.5, gt=0, description="learning rate of the head and the channel scales, as a "
                                 "multiple of the run's (the official 0.0035 * 6.5)")
    fuse: bool = Field(True, description="on the trained classes, score (1 - w) similarity + w head; false: the "
                       "head alone")


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel (the official FiLM), from the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class DePT(PromptMethod):
    needs_of_wrapped = ("features",)

    def __init__(self, backbone, classes: ClassSet, options: DePTOptions, base: PromptMethod):
        super().__init__(backbone, classes, options)
        self.base = base  # the wrapped method, built by the core from its own plug-in
        self.inputs, self.per_image_text = base.inputs, base.per_image_text
        dim = backbone.embed_dim
        self.text_affine, self.image_affine = ChannelAffine(dim), ChannelAffine(dim)
        self.head = nn.Linear(dim, len(classes))  # over the classes it trains on
        self._head_classes = list(classes.names)
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.base.set_classes(classes)
        names = list(classes.names)
        # the head scores only classes it was trained on (in any order); others get the base's scores
        self._head_rows = ([self._head_classes.index(n) for n in names]
                           if set(names) <= set(self._head_classes) else None)

    def parameter_groups(self) -> list[ParamGroup]:
        own = [*self.text_affine.parameters(), *self.image_affine.parameters(), *self.head.parameters()]
        return [*self.base.parameter_groups(), ParamGroup(own, lr_scale=self.options.head_lr_scale)]

    def _head_logits(self, text: torch.Tensor | None, image: torch.Tensor, labels: torch.Tensor | None):
        """Head logits of the images (and, with labels, first of their classes' text features)."""
        rows = self.image_affine(image.float())
        if labels is not None:
            rows = torch.cat([self.text_affine(text.float())[labels], rows])
        return self.head(rows)

    def forward(self, batch: Batch) -> MethodOutput:
        out = self.base(batch)
        text, image = out.extras[TEXT_FEATURES], out.extras[IMAGE_FEATURES]
        if self.training and batch.labels is not None:
            if self._head_rows != list(range(len(self._head_classes))):
                raise RuntimeError("DePT trains only on the classes it was built for")
            head = self._head_logits(text, image, batch.labels)
            cat = self.options.head_weight * F.cross_entropy(head, torch.cat([batch.labels, batch.labels]))
            return MethodOutput(out.logits, losses={**out.losses, "cat": cat},
                                extras={**out.extras, "base_output": out})
        if self._head_rows is None:
            return out  # classes the head never saw: the wrapped method's scores
        head = self._head_logits(None, image, None)[:, self._head_rows]
        w = self.options.head_weight
        logits = (1 - w) * out.logits.float() + w * head if self.options.fuse else head
        return MethodOutput(logits, losses=out.losses, extras=out.extras)

    def loss(self, output: MethodOutput, batch: Batch) -> torch.Tensor:
        """The wrapped method's loss with weight ``w`` of its cross-entropy moved to the head."""
        base = self.base.loss(output.extras["base_output"], batch)
        moved = self.options.head_weight * F.cross_entropy(output.logits.float(), batch.labels)
        return base - moved + output.losses["cat"].float()


#: The official setting (Koorye/DePT ``train.py`` extend_cfg, ``configs.py`` coop_dept /
#: kgcoop_dept, ``configs/trainers/ExtrasLinearProbe{CoOp,KgCoOp}/*.yaml``): SGD lr 0.0035,
#: batch 4, 10 epochs, cosine after one constant warm-up epoch at 1e-5; head and channel
#: scales at 6.5 x the lr; w = 0.7. Per wrapped method (``options.base``, over that method's
#: own recipe options): KgCoOp's W = 2.0 (CoOp's 16 random context vectors and KgCoOp's
#: "a photo of a" are those methods' own defaults).
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.0035, "batch_size": 4, "epochs": 10, "momentum": 0.9,
           "weight_decay": 5e-4, "warmup_epochs": 1, "warmup_lr": 1e-5},
    options={"base": {"kgcoop": {"kg_weight": 2.0}}},
    source="Koorye/DePT train.py (extend_cfg), configs.py (coop_dept, kgcoop_dept), "
    "configs/trainers/ExtrasLinearProbeCoOp/vit_b16_ep10_bs4_lr35.yaml, "
    "configs/trainers/ExtrasLinearProbeKgCoOp/vit_b16_ep10_ctxv1_bs4_lr35.yaml",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("dept", DePTOptions, DePT,
                        "DePT: a channel-adjusted linear head over the base classes, added to a wrapped "
                        "text-context method (base: {name: coop|kgcoop, ...})", RECIPE)]
