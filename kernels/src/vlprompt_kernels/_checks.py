"""Argument checks of the two ops, shared by every backend but the reference.

They raise the same ``ValueError`` messages as :mod:`vlprompt_kernels.reference`
(which keeps its own inline checks so that its code, and hence its numbers, stay
exactly as they were); ``kernels/tests/test_ops.py`` runs the bad-input cases
against every backend.
"""

from __future__ import annotations

import torch


def check_assemble(base: torch.Tensor, ctx: torch.Tensor, slots: torch.Tensor) -> tuple[int, ...]:
    """Validate ``assemble_prompts`` arguments; return the broadcast lead shape ``S x (C,)``."""
    if base.dim() != 3:
        raise ValueError(f"base must be [C, L, D], got {list(base.shape)}")
    n_cls, length, dim = base.shape
    if slots.shape != (n_cls, length):
        raise ValueError(f"slots must be [C, L] = {[n_cls, length]}, got {list(slots.shape)}")
    if ctx.dim() < 2 or ctx.shape[-1] != dim:
        raise ValueError(f"ctx must be [*S, M, {dim}], got {list(ctx.shape)}")
    if slots.numel() and int(slots.max()) >= ctx.shape[-2]:
        raise ValueError(f"slots refer to context vector {int(slots.max())}, ctx has {ctx.shape[-2]}")
    try:
        lead = torch.broadcast_shapes(ctx.shape[:-2], (n_cls,))
    except RuntimeError:
        raise ValueError(f"ctx leading dims {list(ctx.shape[:-2])} do not broadcast against C = {n_cls}") from None
    return tuple(lead)


def check_cosine(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Validate ``cosine_logits`` feature shapes."""
    if image_features.dim() != 2 or text_features.dim() not in (2, 3):
        raise ValueError(
            f"expected image [B, D] and text [C, D] or [B, C, D], got {list(image_features.shape)} "
            f"and {list(text_features.shape)}"
        )
    if image_features.shape[-1] != text_features.shape[-1]:
        raise ValueError(f"feature widths differ: {image_features.shape[-1]} vs {text_features.shape[-1]}")
    if text_features.dim() == 3 and text_features.shape[0] != image_features.shape[0]:
        raise ValueError(f"per-image text features for {text_features.shape[0]} images, got {image_features.shape[0]}")
