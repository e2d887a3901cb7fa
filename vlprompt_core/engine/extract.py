"""Frozen image features, extracted once per run (or read from the feature cache)
and shared by every method and seed that reads the same images the same way: the
test splits, and the K augmented views of the training images (``train.augment_views``)."""

from __future__ import annotations

import torch

from ..api import EvalSet, Item
from ..errors import UserError
from ..data import UnreadableImages, test_transform
from ..features import Features
from ..settings import TrainSpec
from .batches import image_loader
from .context import RunContext, autocast, resolve_precision


@torch.no_grad()
def _encode(backbone, loader, ctx: RunContext, precision: str, task) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every batch of ``loader`` through the frozen image tower (fp32 features), and its labels."""
    feats, labels = [], []
    for images, y in loader:
        with autocast(ctx.device, precision):
            feats.append(backbone.encode_image(images.to(ctx.device)).float())
        labels.append(y)
        ctx.progress.advance(task, 1)
    return feats, labels


def train_views(backbone, items: list[Item], tf, settings: TrainSpec, ctx: RunContext) -> Features:
    """``train.augment_views`` = K augmented views of every training image through
    the frozen image tower, ``[K, N, D]``: extracted once for every method and seed
    with these items and transform (the draws depend on the items alone, not on the
    run's seed or on what ran before), or read from the feature cache."""
    k_views = settings.augment_views
    precision = resolve_precision(ctx.device, settings.precision)
    key = ctx.features.key(backbone, items, {"kind": "train views", "views": k_views, "transform": repr(tf),
                                             "precision": precision, "device": ctx.device.type})

    def compute() -> Features:
        left_out = UnreadableImages()
        loader = image_loader(items, tf, settings.eval_batch_size, settings, shuffle=False, unreadable=left_out)
        task = ctx.progress.start(f"features: {k_views} views of {len(items)} training images", k_views * len(loader))
        views, labels = [], []
        with torch.random.fork_rng(devices=[]):
            for k in range(k_views):
                torch.manual_seed(k)
                feats, ys = _encode(backbone, loader, ctx, precision, task)
                if not feats:
                    raise UserError(f"none of the {len(items)} training images could be read")
                views.append(torch.cat(feats))
                labels = labels or ys
        ctx.progress.stop(task)
        return Features(torch.stack(views), torch.cat(labels), dict(left_out.reasons))

    return ctx.features.get(key, "train views", compute, ctx.unreadable, items)


def test_features(backbone, eval_set: EvalSet, settings: TrainSpec, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen image features of an eval split (and its labels), on the run's device."""
    tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    precision = resolve_precision(ctx.device, settings.precision)
    key = ctx.features.key(backbone, eval_set.items, {"kind": "test", "transform": repr(tf),
                                                      "precision": precision, "device": ctx.device.type})

    def compute() -> Features:
        left_out = UnreadableImages()
        loader = image_loader(eval_set.items, tf, settings.eval_batch_size, settings, shuffle=False,
                              unreadable=left_out)
        task = ctx.progress.start(f"features: {eval_set.name}", len(loader))
        feats, labels = _encode(backbone, loader, ctx, precision, task)
        ctx.progress.stop(task)
        if not feats:
            raise UserError(f"{eval_set.name}: none of its {len(eval_set.items)} images could be read")
        return Features(torch.cat(feats), torch.cat(labels), dict(left_out.reasons))

    found = ctx.features.get(key, f"features: {eval_set.name}", compute, ctx.unreadable, eval_set.items)
    return found.features.to(ctx.device), found.labels.to(ctx.device)
