"""Deep prompts: learned tokens that enter the towers' later blocks, not only the first.

What MaPLe, IVLP, deep VPT, deep language prompting and PromptSRC share:

* **text**: block 0 gets the prompt table's context vectors (:class:`PromptTable`);
  before each block ``l = 1 .. J-1`` the states at the context slots are replaced
  by that block's own prompts (:func:`text_prompt_hook`, a slots-only
  :class:`~vlprompt_core.api.ContextHook`, so the shared-prefix text pass stays on);
* **image**: the block-0 prompts are appended after the patch tokens
  (:func:`append_prompts`; the official code does it before the pre-norm), and
  before each block ``l = 1 .. J-1`` the last ``n`` tokens are replaced by that
  block's prompts (:func:`vision_prompt_hook`);
* a depth ``J`` counts the layers with prompts, block 0 included, and is clamped to
  the tower (:func:`prompt_depth`); :func:`deep_prompts` makes the ``J - 1`` tensors
  of the later blocks.

Prompts after the last prompted block are left in place: their tokens keep flowing
through the remaining blocks, as in the official code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..api import BlockContext, ContextHook


def prompt_depth(depth: int, tower_depth: int) -> int:
    """Layers that get prompts (block 0 included) when ``depth`` is asked of a tower
    of ``tower_depth`` blocks: ``min(depth, tower_depth)``."""
    return max(0, min(depth, tower_depth))


def deep_prompts(count: int, n: int, width: int, std: float = 0.02, device=None) -> nn.ParameterList:
    """``count`` learned tensors ``[n, width]``, each drawn from ``N(0, std^2)``: the
    prompts of blocks ``1 .. count`` (``deep_prompts(1, n, backbone.vision_width)[0]``
    draws one, e.g. the image prompts of block 0)."""
    return nn.ParameterList(
        nn.Parameter(torch.empty(n, width, device=device).normal_(0, std)) for _ in range(max(count, 0))
    )


def replace_slots(x: torch.Tensor, slots: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, L, W]`` with the state at each context slot replaced: position ``i`` of
    row ``r`` becomes ``prompt[slots[r, i]]`` where ``slots[r, i] >= 0`` (``prompt``
    ``[M, W]``)."""
    picked = prompt.to(x.dtype)[slots.clamp(min=0)]  # [N, L, W]
    return torch.where((slots >= 0).unsqueeze(-1), picked, x)


def text_prompt_hook(deep: Sequence[torch.Tensor]) -> ContextHook:
    """A slots-only :class:`~vlprompt_core.api.ContextHook`: before text block
    ``l = 1 .. len(deep)``, ``deep[l - 1]`` ``[M, text_width]`` replaces the states at the
    context slots (the prompts of the block before are dropped); other blocks as they are."""
    deep = list(deep)

    def hook(layer: int, x: torch.Tensor, context: BlockContext) -> torch.Tensor:
        if not 1 <= layer <= len(deep):
            return x
        if context.slots is None:
            raise ValueError("deep text prompts need the context slots: run the text pass through PromptTable.encode")
        return replace_slots(x, context.slots, deep[layer - 1])

    return ContextHook(hook, slots_only=True)


def append_prompts(tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """``tokens`` ``[B, T, W]`` followed by ``prompt`` ``[n, W]`` (the same for every image)."""
    return torch.cat([tokens, prompt.to(tokens.dtype).expand(tokens.shape[0], -1, -1)], dim=1)


def vision_prompt_hook(deep: Sequence[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A block hook: before image block ``l = 1 .. len(deep)`` the last ``n`` tokens (the
    prompts :func:`append_prompts` added, as the block before left them) are replaced by
    ``deep[l - 1]`` ``[n, vision_width]``; other blocks as they are."""
    deep = list(deep)

    def hook(layer: int, x: torch.Tensor) -> torch.Tensor:
        if not 1 <= layer <= len(deep):
            return x
        prompt = deep[layer - 1]
        return append_prompts(x[:, : x.shape[1] - prompt.shape[0]], prompt)

    return hook
