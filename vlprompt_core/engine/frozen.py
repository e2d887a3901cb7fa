"""The frozen features a method fits from outside the gradient steps
(:class:`~vlprompt_core.api.FrozenData`): the plan's training and validation splits,
extracted once per run like every frozen feature (:mod:`.extract`), never a test split."""

from __future__ import annotations

import torch

from ..api import EvalSet, FrozenData, FrozenFeatures, Plan
from ..data import train_transform
from ..settings import TrainSpec
from .context import RunContext
from .extract import test_features, train_views


class PlanFeatures(FrozenData):
    """:class:`~vlprompt_core.api.FrozenData` of one plan, on the run's device; each
    split is extracted at most once per run (and read from the feature cache)."""

    def __init__(self, backbone, plan: Plan, settings: TrainSpec, ctx: RunContext):
        self.backbone, self.plan, self.settings, self.ctx = backbone, plan, settings, ctx
        self.classes = plan.classes

    def train(self, views: int = 0) -> FrozenFeatures:
        if views < 0:
            raise ValueError(f"views must be >= 0, got {views}")
        if views == 0:
            return FrozenFeatures(*test_features(self.backbone, EvalSet("train", self.plan.train, self.classes),
                                                 self.settings, self.ctx))
        bb = self.backbone
        tf = train_transform(bb.image_size, bb.image_mean, bb.image_std, self.settings.crop_scale)
        found = train_views(bb, self.plan.train, tf, self.settings.model_copy(update={"augment_views": views}),
                            self.ctx)
        return FrozenFeatures(found.features.to(self.ctx.device), found.labels.to(self.ctx.device))

    def val(self) -> FrozenFeatures:
        if not self.plan.val:
            dim = self.backbone.embed_dim
            return FrozenFeatures(torch.zeros(0, dim, device=self.ctx.device),
                                  torch.zeros(0, dtype=torch.long, device=self.ctx.device))
        return FrozenFeatures(*test_features(self.backbone, EvalSet("val", self.plan.val, self.classes),
                                             self.settings, self.ctx))
