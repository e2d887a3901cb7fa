"""Batches of images for training and evaluation: :class:`ImageLoader` (a torch
DataLoader whose workers never raise on an unreadable image; the policy ``error`` or
``skip`` decides what happens to it) and :class:`ShuffledBatches`, the shuffled
batch order that a run resumed mid-epoch can pick up after the batches it already
trained on."""

from __future__ import annotations

import hashlib

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
    not read again). With ``share`` it yields a process's share of each batch, each index
    with the seed of its augmentation (see :class:`ImageLoader`)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, share: tuple[int, int] | None = None):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.drop_last = n >= batch_size
        self.skip = 0
        self.share = share

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        key = epoch_key(self.generator) if self.share is not None else None
        order = torch.randperm(self.n, generator=self.generator).tolist()
        torch.randperm(self.n, generator=self.generator)  # as RandomSampler draws at the end of its pass
        skip, self.skip = self.skip, 0
        for b in range(skip, len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.share is None:
                yield batch
            else:
                yield [(i, image_seed(key, i)) for i in batch[contiguous_part(len(batch), *self.share)]]


def contiguous_part(n: int, rank: int, processes: int) -> slice:
    """Process ``rank``'s contiguous share of ``n`` things: the first ``n % processes``
    processes take one more than the others."""
    size, extra = divmod(n, processes)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def epoch_key(generator: torch.Generator) -> int:
    """A number for the epoch about to be drawn, read from (not drawn from) the state of
    the generator that orders it: the same in every process, and again in a run resumed
    from a training state (which holds that state)."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def image_seed(key: int, index: int) -> int:
    """The seed of the augmentation of image ``index`` in the epoch of ``key``."""
    return (key + index * 0x9E3779B97F4A7C15) % 2**64


class SeededImages(torch.utils.data.Dataset):
    """``dataset[i]`` drawn under its own seed: ``images[(i, seed)]`` runs the transform
    with torch's random numbers seeded by ``seed`` (and leaves torch's stream as it was),
    so an image's augmentation does not depend on which process or worker reads it, or
    on what was read before."""

    def __init__(self, images: torch.utils.data.Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.images[index]


class ImageLoader:
    """Batches ``(images, labels)`` of ``items`` through a torch DataLoader.

    An image that cannot be read never surfaces as a traceback from a worker
    process: workers hand it back as :class:`Unreadable`, and here it either stops
    the run with a one-line :class:`UserError` naming the file (``on_unreadable=
    "error"``) or is left out of its batch and recorded in ``unreadable``
    (``"skip"``).

    ``share`` = ``(rank, processes)`` (a shuffled loader of a distributed run): each batch
    is this process's contiguous share of the global batch every process draws alike, and
    each image's augmentation is drawn from its own seed (:func:`epoch_key`,
    :func:`image_seed`, :class:`SeededImages`), so the global batch is the same whatever
    the process count. Without it (one process) the augmentations come from torch's one
    stream of random numbers, in batch order, as a DataLoader draws them."""

    def __init__(self, items: list[Item], transform, batch_size: int, shuffle: bool = False,
                 num_workers: int = 0, seed: int = 0, on_unreadable: str = "error",
                 unreadable: UnreadableImages | None = None, share: tuple[int, int] | None = None):
        if on_unreadable not in UNREADABLE_POLICIES:
            raise ValueError(f"on_unreadable must be one of {UNREADABLE_POLICIES}, not {on_unreadable!r}")
        self.on_unreadable = on_unreadable
        self.share = share
        self.unreadable = unreadable if unreadable is not None else UnreadableImages()
        generator = torch.Generator().manual_seed(seed)
        self.batches = ShuffledBatches(len(items), batch_size, generator, share) if shuffle else None
        images = ImageDataset(items, transform, defer_errors=True)
        self.loader = torch.utils.data.DataLoader(
            SeededImages(images) if shuffle and share is not None else images,
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
            if images is None and self.share is not None and self.share[1] > 1:
                # the other processes take this step (their gradients are summed with this one's): this
                # process cannot leave it out alone, and has no image to take it with
                raise UserError(
                    f"every image of process {self.share[0]}'s share of a training batch is unreadable "
                    f"({', '.join(str(b.path) for b in bad[:3])}{', ...' if len(bad) > 3 else ''}): in a run over "
                    f"{self.share[1]} processes each takes part in every step; replace or remove the files, "
                    "or run in one process (which leaves such a batch out)")
            if images is not None:
                yield images, labels
