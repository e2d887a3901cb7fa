"""The text pass sharded over classes across the processes of a distributed run.

A method whose class text features are shared by every image of a batch (CoOp,
KgCoOp...: one context for all images) computes the same ``[C, D]`` features in every
process of a data-parallel run. Under :func:`sharded_over_classes` (the engine enters it
around a training forward pass of a method that opts in,
:attr:`~vlprompt_core.api.PromptMethod.shards_classes`), each process encodes only its
slice of the classes and the slices are gathered with their gradient: the activations the
backward pass keeps, the larger part of a 1000-class step, fall with the process count
instead of being repeated in every process.

:meth:`~vlprompt_core.prompting.PromptTable.encode` does it by itself; a method with its
own text pass uses :func:`shard_classes`. Outside the context (one process, evaluation,
a method that does not opt in), both compute every class as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Protocol

import torch


class ClassSharding(Protocol):
    """What the sharded pass needs of the run (the engine's distributed strategy)."""

    rank: int
    world_size: int

    def part(self, n: int, rank: int | None = None) -> slice:
        """The contiguous share of ``n`` classes of process ``rank`` (default: this one)."""

    def gather_classes(self, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every process's features (dim -2, ``sizes[r]`` classes each) in rank order, with their gradient."""


_SHARDING: contextvars.ContextVar[ClassSharding | None] = contextvars.ContextVar("vlprompt_class_sharding",
                                                                                  default=None)


@contextlib.contextmanager
def sharded_over_classes(sharding: ClassSharding | None) -> Iterator[None]:
    """Text passes inside are sharded over classes by ``sharding`` (None: not sharded)."""
    token = _SHARDING.set(sharding)
    try:
        yield
    finally:
        _SHARDING.reset(token)


def current_class_sharding() -> ClassSharding | None:
    """The sharding :func:`sharded_over_classes` set here, when a pass with gradients
    can use it (more than one process), else None."""
    sharding = _SHARDING.get()
    if sharding is None or sharding.world_size < 2 or not torch.is_grad_enabled():
        return None
    return sharding


def shard_classes(n_classes: int, encode: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """Features ``[..., n_classes, D]`` of every class, where ``encode(classes)`` gives those
    of a slice of the classes (``[..., len, D]``, the same in every process for a given
    slice). Under :func:`sharded_over_classes` this process encodes only its slice and the
    others' are gathered with their gradient (the backward pass sends each process the
    gradient of its slice summed over the processes: weighted by each process's share
    of the batch, as the engine weights their losses, the sum is the one-process
    gradient); otherwise ``encode(slice(0, n_classes))``."""
    sharding = current_class_sharding()
    if sharding is None or n_classes < sharding.world_size:
        return encode(slice(0, n_classes))
    sizes = [len(range(n_classes)[sharding.part(n_classes, r)]) for r in range(sharding.world_size)]
    with sharded_over_classes(None):  # the slice itself is one process's pass
        local = encode(sharding.part(n_classes))
    return sharding.gather_classes(local, sizes)

