"""What the engine asks of the processes a run is spread over (:class:`Strategy`), and
the answer of a run in one process: every method does nothing or hands back what it was
given, so a plain ``vlprompt run`` computes bit for bit what it computed before runs could
be spread. :class:`~.distributed.Distributed` answers for the processes of a
``torch.distributed`` group (:mod:`.distributed` says how)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..data.loader import contiguous_part
from ..errors import UserError


@dataclass(frozen=True)
class StepLoss:
    """The loss of one training step over the global batch: its ``images`` and the sum
    of the loss over them (``total``)."""

    images: int
    total: float

    @property
    def mean(self) -> float:
        return self.total / self.images


class OtherProcessStopped(UserError):
    """What a process other than the main one raises when the main one stopped the run
    before it began (the folder in use...): the main process has said why."""


def batch_share_problem(smallest: int, processes: int) -> str | None:
    """Why batches of ``smallest`` images cannot be shared by ``processes`` (each needs at
    least one image of every batch), or None."""
    if processes > 1 and smallest < processes:
        return (f"a batch of {smallest} image(s) cannot be shared by {processes} processes (each needs at least one); "
                f"use a batch size of at least {processes}, or fewer processes")
    return None


class Strategy:
    """The run in one process: nothing is shared, nothing is split."""

    rank = 0
    world_size = 1
    #: Whether the run is one of ``torch.distributed``'s (any process count, one included):
    #: then every training image's augmentation has its own seed.
    distributed = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (and logs, and draws progress)."""
        return self.rank == 0

    def describe(self) -> str | None:
        return None

    # ---------------------------------------------------------------- placing and splitting
    def place(self, device: torch.device) -> torch.device:
        """The device this process runs on, for the run's ``device``."""
        return device

    def part(self, n: int, rank: int | None = None) -> slice:
        """The contiguous share of ``n`` things of process ``rank`` (default: this one;
        :func:`~vlprompt_core.data.loader.contiguous_part`)."""
        return contiguous_part(n, self.rank if rank is None else rank, self.world_size)

    def blocks(self, n: int, size: int) -> slice:
        """This process's share of ``n`` things in whole blocks of ``size`` (evaluation
        batches): every block is as it is in one process."""
        mine = self.part(-(-n // size))
        return slice(min(mine.start * size, n), min(mine.stop * size, n))

    @property
    def share(self) -> tuple[int, int] | None:
        """``(rank, processes)`` for a training loader that draws each image's augmentation
        from its own seed and yields this process's share of every batch; None in one
        process (one stream of draws, whole batches)."""
        return None

    def check_batches(self, smallest: int) -> None:
        """Every process needs at least one image of every batch (``smallest`` images)."""
        problem = batch_share_problem(smallest, self.world_size)
        if problem:
            raise UserError(f"train.batch_size: {problem}")

    # ---------------------------------------------------------------- a training step
    def global_loss(self, loss: torch.Tensor, images: int) -> StepLoss:
        """The step's loss over the global batch, from this process's ``loss`` (a mean over
        its ``images``)."""
        return StepLoss(images, loss.item() * images)

    def local_loss(self, loss: torch.Tensor, images: int, step: StepLoss) -> torch.Tensor:
        """What this process back-propagates: its loss weighted by its share of the
        batch's images (in one process, the loss itself)."""
        return loss

    def all_reduce_grads(self, params: dict[str, torch.nn.Parameter]) -> None:
        """The gradients of ``params`` summed over the processes (in one process, as they are)."""

    def sharding_classes(self, method) -> contextlib.AbstractContextManager:
        """The context of a training forward pass: the text pass sharded over classes
        when the method opts in (:attr:`~vlprompt_core.api.PromptMethod.shards_classes`)."""
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- sharing values
    def sum(self, values: list) -> list:
        """``values`` (numbers) summed over the processes, ints staying ints."""
        return values

    def max(self, value: float) -> float:
        return value

    def gather_objects(self, obj: Any) -> list:
        """Every process's ``obj`` (picklable), in rank order."""
        return [obj]

    def first(self, problem: str | None) -> str | None:
        """The first process's problem (in rank order), or None when none has one: a
        failure every process agrees on."""
        return problem

    def gather_rows(self, tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """Every process's rows (its share, in rank order) concatenated along dim 0, on
        ``device``; a process with no rows gives None."""
        return tensor

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` in the main process, its value handed to every process (an
        exception there stops the others with :class:`OtherProcessStopped`)."""
        return compute()

    def tensor_from_main(self, tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The main process's ``tensor`` on every process (on ``device``)."""
        return tensor

    def say_once(self, key: str, line: str, log: Callable[[str], None]) -> None:
        """``log(line)`` the first time ``key`` is said in this run."""

    def close(self) -> None:
        """Leave the process group (when this strategy joined it)."""
