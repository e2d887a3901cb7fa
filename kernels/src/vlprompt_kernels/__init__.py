"""Ops for prompt learning: prompt assembly and cosine-similarity logits.

Methods call these functions, never a backend directly: each call runs either
the fused Triton kernels (:mod:`vlprompt_kernels.triton_backend`) or the PyTorch
reference (:mod:`vlprompt_kernels.reference`, the ground truth), chosen per call:

* ``"auto"`` (default): Triton for CUDA tensors when ``triton`` imports, the
  reference otherwise (CPU tensors, no Triton, float64, ...);
* ``"reference"`` / ``"triton"``: forced, by :func:`use_backend` or the
  environment variable ``VLPROMPT_KERNELS``; a forced ``"triton"`` that cannot
  run raises :class:`BackendUnavailable` instead of falling back.

:func:`backend_info` says which backend the ops will use on a device and why,
as a dict for logs and ``results.json``. The first choice made in a process is
logged once on the ``vlprompt_kernels`` logger.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import ENV_VAR, BackendUnavailable, backend_info, use_backend
from ._dispatch import select as _select

__all__ = [
    "ENV_VAR",
    "BackendUnavailable",
    "assemble_prompts",
    "backend_info",
    "cosine_logits",
    "reference",
    "use_backend",
]


def _unsupported(op, *tensors, scale=None):
    def check():
        from .triton_backend import unsupported

        return unsupported(op, *tensors, scale=scale)

    return check


def assemble_prompts(
    base: torch.Tensor,
    ctx: torch.Tensor,
    slots: torch.Tensor,
    positional: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write learned context vectors into the context slots of embedded prompts.

    Args:
        base: ``[C, L, D]`` token embeddings of one prompt per class (the context
            slots hold placeholder embeddings that get replaced).
        ctx: ``[*S, M, D]`` context vectors, where ``S`` broadcasts against ``[C]``:
            ``()`` shared by all classes, ``(C,)`` one context per class,
            ``(B, 1)`` one per image, ``(B, C)`` one per image and class, and any
            further leading dims (e.g. ``(K, B, 1)`` for K samples per image).
        slots: ``[C, L]`` integer map: ``slots[c, t] = j >= 0`` puts ``ctx[..., c, j]``
            at position ``t`` of class ``c``; ``-1`` keeps ``base[c, t]``.
        positional: optional ``[>= L, D]`` positional embedding added to every prompt.

    Returns:
        ``[*broadcast(S, (C,)), L, D]`` prompt embeddings (bit-identical on every
        backend). On the Triton backend the backward computes the gradient of
        ``ctx`` in one kernel, summed over whatever the layout shares ``ctx`` across.
    """
    backend = _select("assemble_prompts", base.device, _unsupported("assemble_prompts", base, ctx, positional))
    return backend.assemble_prompts(base, ctx, slots, positional)


def cosine_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """``scale * normalize(image) @ normalize(text).T``.

    Args:
        image_features: ``[B, D]``.
        text_features: ``[C, D]`` shared by the batch, or ``[B, C, D]`` per image.
        logit_scale: the (already exponentiated) temperature, e.g. 100 for CLIP.

    Returns:
        ``[B, C]`` logits (equal across backends up to rounding: the Triton kernels
        accumulate in float32 and round once).
    """
    backend = _select(
        "cosine_logits",
        image_features.device,
        _unsupported("cosine_logits", image_features, text_features, scale=logit_scale),
    )
    return backend.cosine_logits(image_features, text_features, logit_scale)
