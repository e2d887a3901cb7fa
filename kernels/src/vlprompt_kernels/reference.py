"""PyTorch references of the two ops every text-prompt method runs.

These are the ground truth that fused kernels are tested against; they are also
what runs wherever a fused kernel is not available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
            ``(B, 1)`` one per image, ``(B, C)`` one per image and class.
        slots: ``[C, L]`` integer map: ``slots[c, t] = j >= 0`` puts ``ctx[..., c, j]``
            at position ``t`` of class ``c``; ``-1`` keeps ``base[c, t]``.
        positional: optional ``[>= L, D]`` positional embedding added to every prompt.

    Returns:
        ``[*broadcast(S, (C,)), L, D]`` prompt embeddings.
    """
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
    ctx = ctx.expand(*lead, *ctx.shape[-2:])
    rows = torch.arange(n_cls, device=base.device)[:, None]
    gathered = ctx[..., rows, slots.clamp(min=0), :]  # [*lead, L, D]
    out = torch.where((slots >= 0)[..., None], gathered, base)
    if positional is not None:
        out = out + positional[:length]
    return out


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
        ``[B, C]`` logits.
    """
    if image_features.dim() != 2 or text_features.dim() not in (2, 3):
        raise ValueError(
            f"expected image [B, D] and text [C, D] or [B, C, D], got {list(image_features.shape)} "
            f"and {list(text_features.shape)}"
        )
    if image_features.shape[-1] != text_features.shape[-1]:
        raise ValueError(f"feature widths differ: {image_features.shape[-1]} vs {text_features.shape[-1]}")
    if text_features.dim() == 3 and text_features.shape[0] != image_features.shape[0]:
        raise ValueError(f"per-image text features for {text_features.shape[0]} images, got {image_features.shape[0]}")
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    if txt.dim() == 2:
        return logit_scale * img @ txt.t()
    return logit_scale * torch.einsum("bd,bcd->bc", img, txt)
