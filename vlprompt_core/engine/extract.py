"""Frozen image features, extracted once per run (or read from the feature cache)
and shared by every method and seed that reads the same images the same way: the
test splits, and the K augmented views of the training images (``train.augment_views``)."""

from __future__ import annotations

from collections.abc import Callable

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


def shared_get(ctx: RunContext, key: str, kind: str, compute: Callable[[], Features],
               items: list[Item]) -> Features:
    """``ctx.features.get(key, ...)`` in every process alike: in one process, that call;
    in a distributed run the main process looks the features up (memory, then its feature
    cache on disk) and tells the others whether to ``compute()`` them with it (each its
    share, gathered: ``compute`` is collective), to take them from memory (every process
    has looked up the same keys in the same order), or to receive them from it. Only the
    main process keeps a feature cache on disk."""
    dist = ctx.dist
    if dist.world_size == 1:
        return ctx.features.get(key, kind, compute, ctx.unreadable, items)
    if dist.is_main:
        computed = []

        def compute_with_all() -> Features:
            dist.from_main(lambda: "compute")
            computed.append(True)
            return compute()

        found = ctx.features.get(key, kind, compute_with_all, ctx.unreadable, items)
        if not computed:
            source = ctx.features.events[-1][1]
            dist.from_main(lambda: source)
            if source != "memory":
                dist.tensor_from_main(found.features, ctx.device)
                dist.tensor_from_main(found.labels, ctx.device)
                dist.from_main(lambda: found.unreadable)
        return found
    source = dist.from_main(lambda: None)
    if source == "compute":
        return ctx.features.get(key, kind, compute, ctx.unreadable, items)
    if source == "memory":
        return ctx.features.get(key, kind, _never, ctx.unreadable, items)
    feats = dist.tensor_from_main(None, ctx.device)
    labels = dist.tensor_from_main(None, ctx.device)
    received = Features(feats, labels, dist.from_main(lambda: None))
    return ctx.features.get(key, kind, lambda: received, ctx.unreadable, items)


def _never() -> Features:
    raise RuntimeError("features the main process had in memory are missing from this process's")


def train_views(backbone, items: list[Item], tf, settings: TrainSpec, ctx: RunContext) -> Features:
    """``train.augment_views`` = K augmented views of every training image through
    the frozen image tower, ``[K, N, D]``: extracted once for every method and seed
    with these items and transform (the draws depend on the items alone, not on the
    run's seed or on what ran before), or read from the feature cache. In a distributed
    run each process extracts a share of the views (view k drawn as one process draws
    it) and the views are gathered."""
    k_views = settings.augment_views
    precision = resolve_precision(ctx.device, settings.precision)
    key = ctx.features.key(backbone, items, {"kind": "train views", "views": k_views, "transform": repr(tf),
                                             "precision": precision, "device": ctx.device.type})

    def compute() -> Features:
        left_out = UnreadableImages()
        loader = image_loader(items, tf, settings.eval_batch_size, settings, shuffle=False, unreadable=left_out)
        mine = range(k_views)[ctx.dist.part(k_views)]  # one process: every view
        task = ctx.progress.start(f"features: {k_views} views of {len(items)} training images", len(mine) * len(loader))
        views, labels, problem = [], [], None
        with torch.random.fork_rng(devices=[]):
            for k in mine:
                torch.manual_seed(k)
                feats, ys = _encode(backbone, loader, ctx, precision, task)
                if not feats:
                    problem = f"none of the {len(items)} training images could be read"
                    break
                views.append(torch.cat(feats))
                labels = labels or ys
        problem = ctx.dist.first(problem)
        if problem:
            raise UserError(problem)
        ctx.progress.stop(task)
        features = ctx.dist.gather_rows(torch.stack(views) if views else None, ctx.device)
        labels = ctx.dist.tensor_from_main(torch.cat(labels) if labels else None, torch.device("cpu"))
        return Features(features, labels, ctx.dist.from_main(lambda: dict(left_out.reasons)))

    return shared_get(ctx, key, "train views", compute, items)


def test_features(backbone, eval_set: EvalSet, settings: TrainSpec, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen image features of an eval split (and its labels), on the run's device. In a
    distributed run each process extracts a share of the split's batches (each batch as
    one process reads it) and the features are gathered."""
    tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    precision = resolve_precision(ctx.device, settings.precision)
    key = ctx.features.key(backbone, eval_set.items, {"kind": "test", "transform": repr(tf),
                                                      "precision": precision, "device": ctx.device.type})

    def compute() -> Features:
        left_out = UnreadableImages()
        mine = eval_set.items[ctx.dist.blocks(len(eval_set.items), settings.eval_batch_size)]
        loader = image_loader(mine, tf, settings.eval_batch_size, settings, shuffle=False, unreadable=left_out)
        task = ctx.progress.start(f"features: {eval_set.name}", len(loader))
        feats, labels = _encode(backbone, loader, ctx, precision, task)
        ctx.progress.stop(task)
        feats = ctx.dist.gather_rows(torch.cat(feats) if feats else None, ctx.device)
        labels = ctx.dist.gather_rows(torch.cat(labels) if labels else None, torch.device("cpu"))
        if feats is None:
            raise UserError(f"{eval_set.name}: none of its {len(eval_set.items)} images could be read")
        reasons = {}
        for part in ctx.dist.gather_objects(dict(left_out.reasons)):
            reasons.update(part)
        return Features(feats, labels, reasons)

    found = shared_get(ctx, key, f"features: {eval_set.name}", compute, eval_set.items)
    return found.features.to(ctx.device), found.labels.to(ctx.device)
