"""Batches of images for training and evaluation: :class:`ImageLoader` (a torch
DataLoader whose workers never raise on an unreadable image; the policy ``error`` or
``skip`` decides what happens to it) and :class:`ShuffledBatches`, the shuffled
batch order that a run resumed mid-epoch can pick up after the batches it already
trained on."""

from __future__ import annotations

import torch

from ..api import Item
from ..errors import UserError
from .images import ImageDataset, UnreadableImages, collate_readable


UNREADABLE_POLICIES = ("error", "skip")


class ShuffledBatches(torch.utils.data.Sampler):
    """A fresh random order every epoch, in batches, the last partial batch dropped when
    there is at least one full batch: the order (and the use of ``generator``) of a
    DataLoader with ``shuffle=True``, plus :attr:`skip` to start the next epoch after
    that many batches (a run resumed mid-epoch: the batches it already trained on are
    not read again)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.drop_last = n >= batch_size
        self.skip = 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        torch.randperm(self.n, generator=self.generator)  # as RandomSampler draws at the end of its pass
        skip, self.skip = self.skip, 0
        for b in range(skip, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


class ImageLoader:
    """Batches ``(images, labels)`` of ``items`` through a torch DataLoader.

    An image that cannot be read never surfaces as a traceback from a worker
    process: workers hand it back as :class:`Unreadable`, and here it either stops
    the run with a one-line :class:`UserError` naming the file (``on_unreadable=
    "error"``) or is left out of its batch and recorded in ``unreadable``
    (``"skip"``)."""

    def __init__(self, items: list[Item], transform, batch_size: int, shuffle: bool = False,
                 num_workers: int = 0, seed: int = 0, on_unreadable: str = "error",
                 unreadable: UnreadableImages | None = None):
        if on_unreadable not in UNREADABLE_POLICIES:
            raise ValueError(f"on_unreadable must be one of {UNREADABLE_POLICIES}, not {on_unreadable!r}")
        self.on_unreadable = on_unreadable
        self.unreadable = unreadable if unreadable is not None else UnreadableImages()
        generator = torch.Generator().manual_seed(seed)
        self.batches = ShuffledBatches(len(items), batch_size, generator) if shuffle else None
        self.loader = torch.utils.data.DataLoader(
            ImageDataset(items, transform, defer_errors=True),
            batch_size=1 if shuffle else batch_size,  # 1: the DataLoader's "unset" when batch_sampler batches
            batch_sampler=self.batches,
            num_workers=num_workers,
            generator=generator,
            collate_fn=collate_readable,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, bad in self.loader:
            if bad and self.on_unreadable == "error":
                raise UserError(
                    f"{bad[0].message()}; replace or remove the file, or set 'train: {{unreadable_images: skip}}' "
                    "to leave unreadable images out (they are counted in results.json)"
                )
            for image in bad:
                self.unreadable.add(image)
            if images is not None:
                yield images, labels
