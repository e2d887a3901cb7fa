"""Tip-Adapter's arithmetic on feature tensors, free of any run: the cache keys, the
cache's scores, the alpha/beta grid and its search.

Shapes: ``D`` the feature width, ``N`` cached training images, ``C`` classes, ``B`` images
scored. Image features passed here are unit vectors; keys are whatever the method holds
(unit vectors for Tip-Adapter, trained rows for Tip-Adapter-F, which are not re-normalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cache_keys(views: torch.Tensor) -> torch.Tensor:
    """The keys ``[N, D]``: raw (not normalised) features of ``K`` augmented views
    ``[K, N, D]`` (or one view ``[N, D]``) averaged over the views, then normalised."""
    mean = views.float().mean(0) if views.dim() == 3 else views.float()
    return mean / mean.norm(dim=-1, keepdim=True)


def one_hot_values(labels: torch.Tensor, columns: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The values ``[N, C]``: row ``n`` is the one-hot vector of class ``columns[labels[n]]``
    among ``n_classes``, or all zeros where that column is ``-1`` (a cached class that is
    not among the classes scored)."""
    col = columns.to(labels.device)[labels] if labels.numel() else labels
    values = torch.zeros(labels.shape[0], n_classes, device=labels.device)
    keep = col >= 0
    values[keep.nonzero().squeeze(1), col[keep]] = 1.0
    return values


def affinity(image: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: each unit image feature's dot product with each key."""
    return image @ keys.t()


def cache_scores(aff: torch.Tensor, values: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """``[B, C]``: ``exp(-beta (1 - A)) V``, the cache's vote for each class."""
    return (-(beta - beta * aff)).exp() @ values


def tip_logits(clip_logits: torch.Tensor, aff: torch.Tensor, values: torch.Tensor, alpha, beta) -> torch.Tensor:
    """Tip-Adapter's logits: the zero-shot ones plus ``alpha`` times the cache's."""
    return clip_logits + cache_scores(aff, values, beta) * alpha


def search_grid(scale: float, steps: int) -> list[float]:
    """The values searched for one hyper-parameter: ``steps`` values from 0.1 up to (not
    including) ``scale``, ``0.1 + i (scale - 0.1) / steps``."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


@dataclass(frozen=True)
class Searched:
    """What :func:`search` found: ``beta``, ``alpha`` and how many of the images scored
    they classify correctly (``correct`` of ``total``)."""

    beta: float
    alpha: float
    correct: int
    total: int


@torch.no_grad()
def search(clip_logits: torch.Tensor, aff: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
           scale: tuple[float, float], steps: tuple[int, int], rows: int = 4096) -> Searched:
    """The (beta, alpha) of the grid (``scale``, ``steps``: beta's first, alpha's second)
    whose Tip-Adapter logits classify most of ``labels`` correctly: beta in the outer loop,
    alpha in the inner one, the first best kept (a later pair must do strictly better);
    (0, 0) when no pair gets any image right. ``rows``: images per chunk (memory only)."""
    betas, alphas = search_grid(scale[0], steps[0]), search_grid(scale[1], steps[1])
    best = Searched(0.0, 0.0, 0, labels.shape[0])
    if labels.numel() == 0:
        return best
    for beta in betas:
        correct = torch.zeros(len(alphas), dtype=torch.long, device=labels.device)
        for start in range(0, labels.shape[0], rows):
            part = slice(start, start + rows)
            cache = cache_scores(aff[part], values, beta)
            for i, alpha in enumerate(alphas):
                pred = (clip_logits[part] + cache * alpha).argmax(-1)
                correct[i] += (pred == labels[part]).sum()
        counts = correct.tolist()
        for alpha, count in zip(alphas, counts):
            if count > best.correct:
                best = Searched(beta, alpha, count, labels.shape[0])
    return best
