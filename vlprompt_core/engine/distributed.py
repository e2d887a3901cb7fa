"""One run over several processes (``torchrun --nproc-per-node N -m vlprompt run spec.yaml``,
or ``vlprompt run --nproc N``): what the engine asks of the processes it runs in.

The engine talks to a :class:`Strategy` at a few places, and nowhere else knows how
many processes there are. :class:`Strategy` itself is the run in one process: every
method does nothing or hands back what it was given, so a plain ``vlprompt run``
computes bit for bit what it computed before this module existed.
:class:`Distributed` is the run in the processes of a ``torch.distributed`` group
(gloo on the CPU, NCCL on GPUs, one GPU per process):

* **data parallel training** — every process holds the same method (built from the same
  seed) and draws the same global batches; each trains on its contiguous share of each
  batch (:meth:`~Strategy.part`). Its loss is weighted by its share of the batch's images
  (:meth:`~Strategy.local_loss`) and the gradients of the trainable tensors are summed
  over the processes (:meth:`~Strategy.all_reduce_grads`), so every process takes the step
  one process takes on the whole batch (for a loss that is a mean over the batch's images
  plus terms that do not depend on them: what every method's loss is); the learning-rate
  schedule counts the same global steps.
* **the text pass sharded over classes** for a method that says its text features are
  shared by the batch (:attr:`~vlprompt_core.api.PromptMethod.shards_classes`): each process
  encodes a slice of the classes and the features are gathered with their gradient
  (:meth:`~Strategy.sharding_classes`, :mod:`vlprompt_core.prompting.sharding`);
* **frozen features** extracted in shares and gathered (:mod:`.extract`), **evaluation**
  scored in shares and summed (:mod:`.evaluate`);
* **one writer**: only the main process (rank 0) holds the results folder's lock and writes
  ``results.json``, checkpoints and training states (:attr:`~Strategy.is_main`); what it
  decides (the pairs already done) it tells the others (:meth:`~Strategy.from_main`).

The random draws do not depend on the process count: the batches' order and
``augment_views``' views come from the data generator every process holds alike, and
a distributed run (any count, one included) draws each training image's augmentation
from its own seed (:class:`~vlprompt_core.data.ImageLoader`'s ``share``), where a run in
one process draws them all from torch's one stream, as it always has. So ``torchrun`` with
1, 2 or 8 processes trains the same prompts (within float rounding), and a training state
written with one process count is resumed with another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import UserError
from ..settings import device_type
from .strategy import OtherProcessStopped, StepLoss, Strategy

__all__ = ["Distributed", "OtherProcessStopped", "StepLoss", "Strategy", "current", "from_environment", "launched",
           "main_holds"]


class Distributed(Strategy):
    """The run in the processes of a ``torch.distributed`` process group (the default one
    unless ``group`` is given), already initialised; ``owned``: :meth:`close` destroys it."""

    distributed = True

    def __init__(self, group=None, owned: bool = False):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.owned = owned
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        nccl = self.backend == "nccl"
        #: Where collectives run: NCCL needs the process's GPU, gloo takes CPU tensors.
        self.comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self._said: set[str] = set()

    def describe(self) -> str:
        return (f"distributed: {self.world_size} process(es) ({self.backend}); each trains on its share of every "
                "batch, gradients summed; process 0 writes the results")

    def place(self, device: torch.device) -> torch.device:
        if device.type == "cuda":  # one GPU per process: the one torchrun's LOCAL_RANK names
            return torch.device("cuda", self.local_rank)
        return device

    @property
    def share(self) -> tuple[int, int]:
        return self.rank, self.world_size

    def global_loss(self, loss: torch.Tensor, images: int) -> StepLoss:
        t = torch.tensor([images, loss.item() * images], dtype=torch.float64, device=self.comm)
        self.dist.all_reduce(t, group=self.group)
        return StepLoss(int(t[0].item()), t[1].item())

    def local_loss(self, loss: torch.Tensor, images: int, step: StepLoss) -> torch.Tensor:
        return loss * (images / step.images)

    def all_reduce_grads(self, params: dict[str, torch.nn.Parameter]) -> None:
        """One all-reduce of every gradient flattened, with a flag per parameter: one
        that no process gave a gradient stays without (it does not move in this step)."""
        ps = list(params.values())
        if not ps:
            return
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float().to(self.comm)
                 for p in ps]
        flags = torch.tensor([float(p.grad is not None) for p in ps], device=self.comm)
        flat = torch.cat([*parts, flags])
        self.dist.all_reduce(flat, group=self.group)
        had = flat[-len(ps):].tolist()
        offset = 0
        for p, flag in zip(ps, had):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype) if flag else None
            offset += n

    def sharding_classes(self, method) -> contextlib.AbstractContextManager:
        if self.world_size > 1 and getattr(method, "shards_classes", False):
            from ..prompting.sharding import sharded_over_classes

            return sharded_over_classes(self)
        return contextlib.nullcontext()

    def gather_classes(self, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every process's features of its classes (dim -2, ``sizes[r]`` rows each),
        concatenated in rank order, with their gradient: the backward pass sums every
        process's gradient of the whole and hands each process its slice."""
        rows = local.movedim(-2, 0)
        most = max(sizes)
        if rows.shape[0] < most:  # equal shapes for the collective
            rows = torch.cat([rows, rows.new_zeros(most - rows.shape[0], *rows.shape[1:])])
        parts = _GatherRows.apply(rows, self)
        whole = torch.cat([part[:size] for part, size in zip(parts.unbind(0), sizes)])
        return whole.movedim(0, -2)

    def sum(self, values: list) -> list:
        if not values:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm)
        self.dist.all_reduce(t, group=self.group)
        return [int(round(s)) if isinstance(v, int) else s for v, s in zip(values, t.tolist())]

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.comm)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.group)
        return t.item()

    def gather_objects(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def first(self, problem: str | None) -> str | None:
        return next((p for p in self.gather_objects(problem) if p is not None), None)

    def gather_rows(self, tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        shapes = self.gather_objects(None if tensor is None else (tuple(tensor.shape), tensor.dtype))
        known = [s for s in shapes if s is not None]
        if not known:
            return None
        (shape, dtype), rows = known[0], [s[0][0] if s is not None else 0 for s in shapes]
        padded = torch.zeros(max(max(rows), 1), *shape[1:], dtype=dtype, device=self.comm)
        if tensor is not None and tensor.shape[0]:
            padded[: tensor.shape[0]] = tensor.to(self.comm)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self.dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:n] for part, n in zip(parts, rows)]).to(device)

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def from_main(self, compute: Callable[[], Any]) -> Any:
        if self.is_main:
            try:
                value = compute()
            except BaseException as exc:
                self.broadcast(("stopped", str(exc) or type(exc).__name__))
                raise
            self.broadcast(("value", value))
            return value
        kind, value = self.broadcast(None)
        if kind == "stopped":
            raise OtherProcessStopped(f"the main process stopped the run: {value}")
        return value

    def tensor_from_main(self, tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        shape, dtype = self.broadcast((tuple(tensor.shape), tensor.dtype) if self.is_main else None)
        buf = tensor.to(self.comm).contiguous() if self.is_main else torch.empty(shape, dtype=dtype, device=self.comm)
        self.dist.broadcast(buf, src=0, group=self.group)
        return buf.to(device)

    def say_once(self, key: str, line: str, log: Callable[[str], None]) -> None:
        if key not in self._said:
            self._said.add(key)
            log(line)

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    """``[processes, *rows.shape]``: every process's ``rows`` (all of one shape), with the
    gradient: the backward pass sums the processes' gradients of the whole (all-reduce)
    and returns this process's part."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, strategy: Distributed) -> torch.Tensor:
        ctx.strategy = strategy
        parts = [torch.empty_like(rows, device=strategy.comm) for _ in range(strategy.world_size)]
        strategy.dist.all_gather(parts, rows.detach().to(strategy.comm).contiguous(), group=strategy.group)
        return torch.stack(parts).to(rows.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        strategy = ctx.strategy
        total = grad.to(strategy.comm).contiguous()
        strategy.dist.all_reduce(total, group=strategy.group)
        return total[strategy.rank].to(grad.device), None


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets
    what ``torch.distributed``'s ``env://`` initialisation reads)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def current() -> Strategy:
    """The strategy of this process: :class:`Distributed` over the default process group
    when one is initialised, else the run in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Distributed()
    return Strategy()


def from_environment(device: str) -> Strategy:
    """Join the process group ``torchrun`` describes in the environment (NCCL when the
    run's ``device`` setting means CUDA, each process on the GPU of its ``LOCAL_RANK``;
    gloo otherwise) and return its strategy; outside ``torchrun``, the run in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Distributed()
    if not launched():
        return Strategy()
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed: run in one process")
    cuda = device_type(device) == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(f"train.device: {device!r} asked for, but CUDA is not available")
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise UserError(f"process {local} on this node has no GPU of its own ({torch.cuda.device_count()} "
                            "visible): start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(owned=True)


@contextlib.contextmanager
def main_holds(strategy: Strategy, make: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """``with make():`` in the main process only (the results folder's lock); the others
    wait until it holds it, and stop (:class:`OtherProcessStopped`) when it cannot."""
    if not strategy.is_main:
        strategy.from_main(lambda: None)
        yield
        return
    with contextlib.ExitStack() as stack:
        strategy.from_main(lambda: stack.enter_context(make()) and None)
        yield
