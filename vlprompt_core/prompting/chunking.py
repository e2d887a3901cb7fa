"""The run-wide text-pass chunking setting: how many prompts go through the text
tower in one pass (:func:`text_chunking`, :func:`rows_per_pass`), and the
checkpointed passes over the chunks that bound its memory."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from ..api import VisionLanguageBackbone

#: Prompts per text-tower pass: a number ``>= 1``, ``0`` (never chunk) or ``"auto"``.
TextChunking = int | Literal["auto"]

_TEXT_CHUNKING: contextvars.ContextVar[TextChunking] = contextvars.ContextVar("vlprompt_text_chunking", default="auto")

#: ``"auto"`` keeps the activations of one text-tower pass under this many bytes.
AUTO_CHUNK_BUDGET = 1 << 30

#: Width-sized fp32 vectors one text block keeps per token for the backward pass. Counted
#: on the tiny test CLIP (distinct non-parameter storages saved by autograd): about 10 for
#: the full pass (block input, the two norms, q/k/v, attention output, the MLP's 4W
#: hidden state before and after the GELU...), about 12 for the suffix of a shared prefix,
#: which also keeps attention probabilities over the prefix; 12 bounds both. Without
#: gradients only one block's activations are alive at a time, about as many vectors.
ACTIVATION_VECTORS_PER_TOKEN = 12


def _check_chunking(value) -> TextChunking:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"text chunking must be a number of prompts >= 1, 0 (never chunk) or 'auto', got {value!r}")


@contextlib.contextmanager
def text_chunking(value: TextChunking) -> Iterator[None]:
    """Run :meth:`PromptTable.encode` calls inside with this chunking setting: at most
    ``value`` prompts per text-tower pass, ``0`` for all prompts in one pass, or
    ``"auto"`` (the default when nothing is set) for passes whose activations fit
    :data:`AUTO_CHUNK_BUDGET`. A method's own ``chunk_size`` still wins."""
    token = _TEXT_CHUNKING.set(_check_chunking(value))
    try:
        yield
    finally:
        _TEXT_CHUNKING.reset(token)


def current_text_chunking() -> TextChunking:
    """The setting :func:`text_chunking` made here (``"auto"`` when none)."""
    return _TEXT_CHUNKING.get()


def rows_per_pass(
    backbone: VisionLanguageBackbone,
    tokens_per_row: int,
    setting: TextChunking | None = None,
    grad: bool | None = None,
) -> int | None:
    """Prompts per text-tower pass under ``setting`` (default: :func:`current_text_chunking`)
    for prompts of ``tokens_per_row`` tokens; None: all in one pass.

    ``"auto"`` divides :data:`AUTO_CHUNK_BUDGET` by the bytes a prompt's activations
    take: ``tokens_per_row x width x 4 x`` :data:`ACTIVATION_VECTORS_PER_TOKEN`, times
    the depth when ``grad`` (default: whether gradients are enabled; then every block's
    activations may be kept for the backward pass).
    """
    setting = _check_chunking(current_text_chunking() if setting is None else setting)
    if setting == 0:
        return None
    if setting != "auto":
        return setting
    grad = torch.is_grad_enabled() if grad is None else grad
    per_token = backbone.text_width * 4 * ACTIVATION_VECTORS_PER_TOKEN * (backbone.text_depth if grad else 1)
    return max(1, AUTO_CHUNK_BUDGET // (max(tokens_per_row, 1) * per_token))


def _in_chunks(run, recompute: bool, pieces: list) -> list[torch.Tensor]:
    """``run(*piece)`` for each piece; with ``recompute``, each is checkpointed
    (recomputed in the backward pass), so memory is bounded by one piece and the
    gradients are those of a single pass."""
    if len(pieces) == 1:
        return [run(*pieces[0])]
    return [checkpoint(run, *piece, use_reentrant=False) if recompute else run(*piece) for piece in pieces]
