"""Training one (method, seed) pair (:func:`train_pair`): the method's fitting hooks
around the gradient steps, and the training loop (:func:`fit`): epochs of steps over the plan's
training items, the learning-rate schedule, the divergence checks (a non-finite
loss, trainable tensors non-finite or exploded, after every step), and the state saved
after every epoch (and every ``train.checkpoint_every`` steps) so that a run
stopped at any moment continues exactly where it was."""

from __future__ import annotations

import math
import time

from .. import textbook
from ..api import PromptMethod
from ..data import train_transform
from ..settings import TrainSpec
from ..trainstate import Position, check_position
from .batches import ImageBatches, ViewBatches, check_scores, forward, image_loader
from .checkpoints import PairFiles
from .context import RunContext, autocast
from .extract import train_views
from .faults import PairFailed
from .frozen import PlanFeatures
from .optim import divergence, lr_at, make_optimizer, optimizer_groups, set_lr, trainable_parameters


def train_batches(label: str, method: PromptMethod, plan, settings: TrainSpec, seed: int,
                  ctx: RunContext) -> ImageBatches | ViewBatches:
    """Pre-extracted views (``train.augment_views``, for methods that read only frozen
    image features), or fresh augmentations of the training images every epoch."""
    backbone = method.backbone
    tf = train_transform(backbone.image_size, backbone.image_mean, backbone.image_std, settings.crop_scale)
    ctx.dist.check_batches(min(settings.batch_size, len(plan.train)))
    if settings.augment_views and method.inputs == ("image_features",) and not textbook.active():
        return ViewBatches(train_views(backbone, plan.train, tf, settings, ctx), settings.batch_size, seed, ctx.device,
                           ctx.dist.share)
    if settings.augment_views and not textbook.active():
        ctx.log(f"{label}: augment_views applies to methods that read only frozen image features; "
                "it trains on fresh augmentations")
    loader = image_loader(plan.train, tf, settings.batch_size, settings, shuffle=True, seed=seed,
                          unreadable=ctx.unreadable, share=ctx.dist.share)
    return ImageBatches(method, loader, ctx.device, settings.precision)


def diverged(what: str, epoch: int, lr: float, settings: TrainSpec) -> PairFailed:
    """A pair whose training diverged (a non-finite loss, trainable tensors non-finite
    or exploded) fails alone, saying where and what to try."""
    return PairFailed(f"{what} in epoch {epoch + 1} of {settings.epochs} at learning rate {lr:g}; "
                      "try a lower train.lr (the other pairs go on)")


def train_pair(label: str, seed: int, method: PromptMethod, plan, settings: TrainSpec, files: PairFiles,
               ctx: RunContext) -> tuple[list[dict], int]:
    """Everything a pair learns from its training data: :meth:`~PromptMethod.before_training`
    (fit from frozen features), the gradient steps of :func:`fit` when the method has
    trainable parameters and ``train.epochs > 0``, :meth:`~PromptMethod.after_training`
    (e.g. a search on the validation split), then the final checkpoint (trainable
    parameters and fitted tensors). Returns :func:`fit`'s epoch log and image count."""
    data = PlanFeatures(method.backbone, plan, settings, ctx)
    method.set_classes(plan.classes)
    method.eval()
    method.before_training(data)
    log, trained = [], 0
    if trainable_parameters(method) and settings.epochs > 0:
        log, trained = fit(label, seed, method, plan, settings, files, ctx)
    method.set_classes(plan.classes)
    method.eval()
    method.after_training(data)
    if ctx.dist.is_main:
        files.save(method, max(settings.epochs - 1, 0))
    return log, trained


def fit(label: str, seed: int, method: PromptMethod, plan, settings: TrainSpec, files: PairFiles,
        ctx: RunContext) -> tuple[list[dict], int]:
    """Train ``method`` on the plan's training items: one log entry per epoch, and how
    many images went through a training step. In a distributed run (:mod:`.distributed`)
    each process trains on its share of every batch, the step is the one of the whole
    batch, the log is the whole batch's, and the main process alone saves."""
    optimizer = make_optimizer(optimizer_groups(method), settings)
    params = trainable_parameters(method)
    batches = train_batches(label, method, plan, settings, seed, ctx)
    if settings.steps:  # a budget of steps: the epochs it takes, the last one cut short
        settings = settings.model_copy(update={"epochs": math.ceil(settings.steps / len(batches))})
    dist = ctx.dist
    if dist.world_size > 1:
        how = ("each process encodes its share of the classes" if method.shards_classes else
               "not sharded, every process runs it whole (the method does not set shards_classes)")
        dist.say_once(label, f"{label}: data parallel over {dist.world_size} processes; text pass: {how}", ctx.log)
    method.set_classes(plan.classes)
    method.train()
    log: list[dict] = []
    at = Position(0)
    resumed = files.resume(method, optimizer, batches.generator)
    if resumed is not None:
        at, log = resumed
        check_position(files.state, at, settings.epochs, len(batches))
        where = f"step {at.step} of epoch {at.epoch + 1}" if at.step else f"epoch {at.epoch}"
        ctx.log(f"{label} seed {seed}: resuming after {where} of {settings.epochs} ({files.state})")
    task = ctx.progress.start(f"{label} seed {seed}: train", settings.epochs * len(batches))
    ctx.progress.advance(task, at.epoch * len(batches) + at.step)
    every = settings.checkpoint_every
    per_step = settings.schedule_per == "step" and settings.schedule == "cosine"
    trained = 0
    for epoch in range(at.epoch, settings.epochs):
        started = time.perf_counter()
        epoch_start = batches.generator.get_state()
        lr = lr_at(epoch, settings)
        set_lr(optimizer, lr, warmup=epoch < settings.warmup_epochs)
        step, (total, count, correct, terms) = (at.step, at.sums) if epoch == at.epoch else (0, [0.0, 0, 0, {}])
        batches.skip = step
        for batch in batches:
            if settings.steps and epoch * len(batches) + step >= settings.steps:
                break
            labels = batch.labels
            if per_step:
                set_lr(optimizer, lr_at(epoch, settings, step, len(batches)), warmup=epoch < settings.warmup_epochs)
            with autocast(ctx.device, settings.precision), dist.sharding_classes(method):
                out = forward(method, batch)
                loss = method.loss(out, batch)
            check_scores(method, out.logits, batch, len(plan.classes))
            whole = dist.global_loss(loss, len(labels))  # the whole batch's (in one process: this one)
            if not math.isfinite(whole.total):
                raise diverged(f"{label} seed {seed}: the loss became {whole.mean}", epoch, lr, settings)
            optimizer.zero_grad(set_to_none=True)
            method.backward(dist.local_loss(loss, len(labels), whole), out, batch)  # default: loss.backward()
            dist.all_reduce_grads(params)
            optimizer.step()
            problem = divergence(params)
            if problem:
                raise diverged(f"{label} seed {seed}: {problem}", epoch, lr, settings)
            n = whole.images
            trained += n
            total += whole.total
            count += n
            right, *weighted = dist.sum([(method.predict(out).argmax(-1) == labels).sum().item(),
                                         *(float(term.detach()) * len(labels) for term in out.losses.values())])
            correct += right
            for name, value in zip(out.losses, weighted):
                terms[name] = terms.get(name, 0.0) + value
            ctx.progress.advance(task, 1)
            step += 1
            if every and step % every == 0 and step < len(batches) and dist.is_main:
                files.save_state(method, optimizer, epoch_start, Position(epoch, step, [total, count, correct, terms]),
                                 log)
        method.on_epoch_end(epoch, settings.epochs)
        metrics = {"epoch": epoch, "lr": lr, "loss": total / max(count, 1),
                   "train_acc": 100 * correct / max(count, 1), "time_s": time.perf_counter() - started}
        metrics.update({f"loss.{k}": v / max(count, 1) for k, v in terms.items()})
        log.append(metrics)
        if dist.is_main:
            files.save(method, epoch)
            files.save_state(method, optimizer, batches.generator.get_state(), Position(epoch + 1), log)
        ctx.notify("vlprompt_epoch_end", method=label, seed=seed, epoch=epoch, metrics=metrics)
    ctx.progress.stop(task)
    return log, trained
