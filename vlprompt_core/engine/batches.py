"""What a method is given: image loaders, :class:`~vlprompt_core.api.Batch` es of what
its ``inputs`` ask for, the two kinds of training epoch (fresh augmentations, or
pre-extracted views), and the call of the method itself (per image in textbook mode
for methods whose text depends on the image)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import textbook
from ..api import Batch, ContractError, Item, MethodOutput, PromptMethod
from ..data import ImageLoader, UnreadableImages
from ..data.loader import contiguous_part
from ..features import Features
from ..settings import TrainSpec
from .context import autocast


def image_loader(items: list[Item], transform, batch_size: int, settings: TrainSpec, shuffle: bool, seed: int = 0,
                 unreadable: UnreadableImages | None = None, share: tuple[int, int] | None = None) -> ImageLoader:
    return ImageLoader(items, transform, batch_size, shuffle=shuffle, num_workers=settings.num_workers, seed=seed,
                       on_unreadable=settings.unreadable_images, unreadable=unreadable, share=share)


def make_batch(method: PromptMethod, images: torch.Tensor, labels: torch.Tensor | None) -> Batch:
    """What ``method.inputs`` ask for; frozen features once, without a graph."""
    features = None
    if "image_features" in method.inputs:
        with torch.no_grad():
            features = method.backbone.encode_image(images)
    return Batch(images=images if "images" in method.inputs else None, image_features=features, labels=labels)


def forward(method: PromptMethod, batch: Batch) -> MethodOutput:
    """``method(batch)``; in textbook mode a method whose text depends on the image
    is called one image at a time, as the reference code does."""
    if not (textbook.active() and method.per_image_text and len(batch) > 1):
        return method(batch)
    outs = [method(_one_image(batch, i)) for i in range(len(batch))]
    if any(o.extras for o in outs):
        raise ContractError(f"{type(method).__name__}: textbook mode's per-image loop cannot merge extras")
    losses = {k: torch.stack([o.losses[k] for o in outs]).mean() for k in outs[0].losses}
    return MethodOutput(torch.cat([o.logits for o in outs]), losses)


def _one_image(batch: Batch, i: int) -> Batch:
    def pick(t):
        return None if t is None else t[i : i + 1]

    return Batch(images=pick(batch.images), image_features=pick(batch.image_features), labels=pick(batch.labels))


def check_scores(method: PromptMethod, scores: torch.Tensor, batch: Batch, n_classes: int) -> None:
    """A method's scores must be ``[images, classes]`` for the classes it was given."""
    if tuple(scores.shape) != (len(batch), n_classes):
        raise ContractError(
            f"{type(method).__name__} returned scores {list(scores.shape)} for a batch of {len(batch)} images "
            f"and {n_classes} classes (does set_classes rebuild the classifier?)"
        )


@dataclass
class ImageBatches:
    """One epoch of augmented training images (fresh draws every epoch) as
    :class:`Batch` es for a method."""

    method: PromptMethod
    loader: ImageLoader
    device: torch.device
    precision: str

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def generator(self) -> torch.Generator:
        """What orders the images (and seeds loader workers): part of the training state."""
        return self.loader.loader.generator

    @property
    def skip(self) -> int:
        return self.loader.batches.skip

    @skip.setter
    def skip(self, n: int) -> None:
        """Start the next epoch after ``n`` batches (a run resumed mid-epoch)."""
        self.loader.batches.skip = n

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in self.loader:
            images, labels = images.to(self.device), labels.to(self.device)
            with autocast(self.device, self.precision):
                batch = make_batch(self.method, images, labels)
            yield batch


class ViewBatches:
    """One epoch over pre-extracted views (``train.augment_views``): the images in a
    fresh random order (the last partial batch dropped, as the image loader does),
    each with one of its K views drawn at random. With ``share`` = ``(rank, processes)``
    (a distributed run) every process draws the same and yields its contiguous share of
    each batch."""

    def __init__(self, views: Features, batch_size: int, seed: int, device: torch.device,
                 share: tuple[int, int] | None = None):
        self.views = views
        self.features = views.features.to(device)
        self.labels = views.labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        n = self.labels.shape[0]
        self.drop_last = n >= batch_size
        self.skip = 0  # start the next epoch after this many batches (a run resumed mid-epoch)
        self.share = share

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        k_views, n = self.features.shape[:2]
        order = torch.randperm(n, generator=self.generator)
        view = torch.randint(k_views, (n,), generator=self.generator)
        skip, self.skip = self.skip, 0
        for b in range(skip, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.share is not None:
                idx = idx[contiguous_part(len(idx), *self.share)]
            idx_d = idx.to(self.device)
            yield Batch(image_features=self.features[view[idx].to(self.device), idx_d], labels=self.labels[idx_d])
