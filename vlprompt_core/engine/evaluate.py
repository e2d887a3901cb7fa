"""Scoring: top-1 accuracy of a method on one evaluation split, under the
classifier it builds for that split's classes."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import textbook
from ..api import Batch, EvalSet, PromptMethod
from ..data import test_transform
from ..errors import UserError
from ..settings import TrainSpec
from .batches import check_scores, forward, image_loader, make_batch
from .context import RunContext, autocast
from .extract import test_features
from .faults import PairFailed
from .optim import trainable_parameters


def eval_batches(label: str, method: PromptMethod, eval_set: EvalSet, settings: TrainSpec,
                 ctx: RunContext) -> Iterator[Batch]:
    """The batches ``method`` is scored on: the run's frozen features alone, or the
    test images (with those frozen features when the method asks for both). In
    textbook mode every method encodes the test images of every batch itself. In a
    distributed run, this process's share of the batches (:meth:`.distributed.Strategy.blocks`)."""
    bs = settings.eval_batch_size
    features = None
    if "image_features" in method.inputs and not textbook.active():
        features, labels = test_features(method.backbone, eval_set, settings, ctx)
        if "images" not in method.inputs:
            mine = ctx.dist.blocks(len(labels), bs)
            for i in range(mine.start, mine.stop, bs):
                yield Batch(image_features=features[i : i + bs], labels=labels[i : i + bs])
            return
    backbone = method.backbone
    tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    mine = ctx.dist.blocks(len(eval_set.items), bs)
    loader = image_loader(eval_set.items[mine], tf, bs, settings, shuffle=False, unreadable=ctx.unreadable)
    task = ctx.progress.start(f"{label}: eval {eval_set.name}", len(loader))
    # the row of this share's first image among the features (unreadable images have none)
    offset = sum(str(it.path) not in ctx.unreadable.reasons for it in eval_set.items[: mine.start])
    for images, y in loader:
        n = len(y)
        images, y = images.to(ctx.device), y.to(ctx.device)
        if features is None:
            with autocast(ctx.device, settings.precision):
                batch = make_batch(method, images, y)
        else:
            batch = Batch(images=images, labels=y, image_features=features[offset : offset + n])
        yield batch
        offset += n
        ctx.progress.advance(task, 1)
    ctx.progress.stop(task)


def finite_problem(label: str, method: PromptMethod, scores: torch.Tensor, eval_set: EvalSet,
                   settings: TrainSpec) -> str | None:
    """Non-finite scores rank nothing: what the pair fails with (the other pairs go on), or None."""
    bad = ~torch.isfinite(scores).all(-1)
    if not bad.any():
        return None
    value = scores[~torch.isfinite(scores)][0].item()
    if trainable_parameters(method) and settings.epochs > 0:
        hint = (f"with its prompts trained {settings.epochs} epoch(s) at learning rate {settings.lr:g}; "
                "try a lower train.lr")
    else:
        hint = "from a method that trains nothing: its plug-in or the backbone computes them"
    return (f"{label}: its scores on {eval_set.name} are not finite ({value} for {int(bad.sum())} of "
            f"{len(scores)} images in a batch) {hint} (the other pairs go on)")


@torch.no_grad()
def evaluate(label: str, method: PromptMethod, eval_set: EvalSet, settings: TrainSpec, ctx: RunContext) -> float:
    """Top-1 accuracy (%) of ``method`` on ``eval_set`` under its own classifier (in a
    distributed run, every process scores its share and the counts are summed; a
    failure of any process is every process's)."""
    if not eval_set.items:
        raise UserError(f"{eval_set.name}: the evaluation split is empty")
    method.eval()
    try:
        method.set_classes(eval_set.classes)
    except UserError as exc:  # a method that scores only its own classes (fixed_classes): this pair alone
        raise PairFailed(f"{label}: cannot score {eval_set.name}: {'; '.join(exc.problems)} "
                         "(the other pairs go on)") from None
    correct = scored = 0
    problem = None
    for batch in eval_batches(label, method, eval_set, settings, ctx):
        with autocast(ctx.device, settings.precision):
            scores = method.predict(forward(method, batch))
        check_scores(method, scores, batch, len(eval_set.classes))
        problem = finite_problem(label, method, scores, eval_set, settings)
        if problem:
            break
        correct += (scores.argmax(-1) == batch.labels).sum().item()
        scored += len(batch.labels)  # unreadable images left out are not scored
    problem = ctx.dist.first(problem)
    if problem:
        raise PairFailed(problem)
    correct, scored = ctx.dist.sum([correct, scored])
    if not scored:
        raise UserError(f"{eval_set.name}: none of its {len(eval_set.items)} images could be read")
    return 100.0 * correct / scored
