"""What trains and how: the method's trainable tensors, its checked parameter
groups, the optimiser, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..api import ContractError, ParamGroup, PromptMethod
from ..settings import TrainSpec


def trainable_parameters(method: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in method.named_parameters() if p.requires_grad}


def learned_tensors(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a pair learns from its training data, and its checkpoint holds: the
    trainable parameters and the fitted tensors
    (:meth:`~vlprompt_core.api.PromptMethod.register_fitted`)."""
    fitted = method.fitted_tensors() if isinstance(method, PromptMethod) else {}
    return {**trainable_parameters(method), **fitted}


def optimizer_groups(method: PromptMethod) -> list[ParamGroup]:
    """The method's parameter groups, checked: every trainable parameter exactly once."""
    groups = method.parameter_groups()
    trainable = {id(p): n for n, p in trainable_parameters(method).items()}
    seen: dict[int, int] = {}
    for g in groups:
        for p in g.params:
            if id(p) not in trainable:
                raise ContractError(f"{type(method).__name__}.parameter_groups() holds a parameter that does not train")
            seen[id(p)] = seen.get(id(p), 0) + 1
    missing = [n for i, n in trainable.items() if i not in seen]
    twice = [trainable[i] for i, k in seen.items() if k > 1]
    if missing or twice:
        raise ContractError(
            f"{type(method).__name__}.parameter_groups() must hold every trainable parameter once "
            f"(missing: {missing}, more than once: {twice})"
        )
    return groups


def make_optimizer(groups: list[ParamGroup], settings: TrainSpec) -> torch.optim.Optimizer:
    """``settings.optimizer`` over ``groups`` (each with its own weight decay, and its
    ``lr_scale`` for :func:`set_lr`), as Dassl's ``build_optimizer`` makes it: ``sgd``
    (momentum, no dampening or Nesterov), ``adam`` (``torch.optim.Adam``: the weight
    decay is an L2 term added to the gradient) and ``adamw`` (decoupled weight decay),
    both with betas (0.9, 0.999) and ``settings.adam_eps``."""
    params = [
        {"params": g.params, "lr_scale": g.lr_scale,
         "weight_decay": settings.weight_decay if g.weight_decay is None else g.weight_decay}
        for g in groups
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, eps=settings.adam_eps, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, eps=settings.adam_eps, weight_decay=settings.weight_decay)


def lr_at(epoch: int, settings: TrainSpec, step: int = 0, steps: int = 1) -> float:
    """The learning rate of step ``step`` (of ``steps`` per epoch) in ``epoch``: ``warmup_epochs``
    at ``warmup_lr``, then cosine from ``lr`` down towards ``min_lr``. Stepped once per epoch
    (``schedule_per: epoch``, the reference: ``T_max = epochs``, so the first epoch after
    warm-up runs at the full ``lr`` and the last one not at the floor), or before every
    step (``schedule_per: step``: ``T_max`` = the steps after warm-up, ``train.steps`` when
    set, as torch's ``CosineAnnealingLR`` stepped per iteration)."""
    if epoch < settings.warmup_epochs:
        return settings.warmup_lr
    if settings.schedule == "constant":
        return settings.lr
    t, t_max = epoch - settings.warmup_epochs, settings.epochs
    if settings.schedule_per == "step":
        t, t_max = t * steps + step, (settings.steps or settings.epochs * steps) - settings.warmup_epochs * steps
    low = settings.min_lr
    return low + (settings.lr - low) * (1 + math.cos(math.pi * t / t_max)) / 2


def set_lr(optimizer: torch.optim.Optimizer, lr: float, warmup: bool = False) -> None:
    """Every group at ``lr`` times its own ``lr_scale``; in a warm-up epoch every group
    at ``lr`` itself, as Dassl's constant warm-up sets every group to its warm-up rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr if warmup else lr * group["lr_scale"]


#: A trainable value beyond this magnitude means that training diverged. What prompt
#: methods train (context vectors in the token-embedding space, about 0.01 to 1; scales;
#: small networks) lives near 1. At 1e6 a float32 cannot take a step smaller than 0.06
#: (the value no longer trains) and half precision (at most 65504) cannot hold it at all,
#: so no sane run gets there, while a diverging one passes it within a step or two.
EXPLODED = 1e6


def divergence(tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with trainable ``tensors`` that diverged (``"ctx became nan"``,
    ``"ctx exploded to 6.5e+10 (beyond ±1e+06)"``), or None. Sane tensors cost one
    reduction and one device sync."""
    tensors = {n: t.detach() for n, t in tensors.items() if t.numel()}
    if not tensors:
        return None
    device = next(iter(tensors.values())).device
    peak = torch.stack([t.abs().max().float().to(device) for t in tensors.values()]).max()
    if peak.item() <= EXPLODED:  # False for NaN too
        return None
    for name, t in tensors.items():
        bad = t[~torch.isfinite(t)]
        if bad.numel():
            return f"{name} became {bad[0].item()}"
    name, t = max(tensors.items(), key=lambda nt: nt[1].abs().max().item())
    return f"{name} exploded to {t.abs().max().item():.2g} (beyond ±{EXPLODED:g})"
