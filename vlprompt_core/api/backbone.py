"""The backbone interface a method may use: :class:`VisionLanguageBackbone`, its block
hooks (:data:`BlockHook`: a plain ``(layer, x)`` function, or a :class:`ContextHook` that
also gets a :class:`BlockContext`), shared text prefixes (:data:`TextPrefix`) and projection
hooks (:data:`ProjectionHook` at a :class:`ProjectionSite`, for weights trained inside the
towers, e.g. LoRA)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal, Union

import torch
from torch import nn

from ..errors import UserError
from .base import ContractError


# ------------------------------------------------------------------------ block hooks


@dataclass(frozen=True)
class BlockContext:
    """What the rows entering a block hold, for a :class:`ContextHook`.

    ``tower``: ``"text"`` or ``"image"``. ``part``: ``"whole"`` (whole prompts or
    images) or ``"prefix"`` (the tokens every class's prompt shares, run once per
    group by :meth:`VisionLanguageBackbone.encode_text_prefix`). For the rows
    ``x[n]`` of the tokens the hook sees (a text chunk, cut after its last pooled
    token): ``classes[n]`` the class index (None for shared prefixes, which stand for
    every class, or when the caller did not say), ``groups[n]`` the index of the row's
    leading context group (the flattened leading dims ``S`` of the context: image,
    sample...; the image index for the image tower), ``slots[n, i]`` the context vector
    at position ``i`` (-1 for any other token; None when unknown).
    """

    tower: Literal["text", "image"]
    part: Literal["whole", "prefix"] = "whole"
    classes: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    slots: torch.Tensor | None = None

    def cut(self, length: int) -> BlockContext:
        """The context of the first ``length`` positions (the causal text pass drops the rest)."""
        return self if self.slots is None else replace(self, slots=self.slots[:, :length])


@dataclass(frozen=True)
class ContextHook:
    """A block hook that also gets a :class:`BlockContext`: ``fn(layer, x, context)``.

    ``slots_only=True`` promises that ``fn`` changes token states only at context slots
    (``context.slots >= 0``), as deep text prompts do (MaPLe, IVLP): a prompt table
    whose context slots all lie in the prefix its classes share then keeps the
    shared-prefix pass and calls the hook on the prefix only (checked: a hook that
    changes other tokens there raises :class:`ContractError`).
    """

    fn: Callable[[int, torch.Tensor, BlockContext], torch.Tensor]
    slots_only: bool = False

    def __call__(self, layer: int, x: torch.Tensor, context: BlockContext) -> torch.Tensor:
        return self.fn(layer, x, context)


#: Called before block ``l`` of a tower with the tokens ``x`` ``[N, L, W]`` entering it;
#: returns the tokens the block gets instead (see
#: :meth:`VisionLanguageBackbone.encode_text_embeddings` for what may change). Either a
#: plain function ``(l, x)``, or a :class:`ContextHook`, called ``(l, x, context)``.
BlockHook = Union[Callable[[int, torch.Tensor], torch.Tensor], ContextHook]


def call_block_hook(hook: BlockHook, layer: int, x: torch.Tensor, context: BlockContext) -> torch.Tensor:
    """``hook(layer, x)``, or ``hook(layer, x, context)`` for a :class:`ContextHook`
    (for backbone implementations)."""
    return hook(layer, x, context) if isinstance(hook, ContextHook) else hook(layer, x)


# ------------------------------------------------------------------- projection hooks


@dataclass(frozen=True)
class ProjectionSite:
    """One attention projection of a tower: block ``layer`` (0-based) of the ``"text"`` or
    ``"image"`` tower, its query, key, value or output projection (``"q"``, ``"k"``, ``"v"``,
    ``"out"``)."""

    tower: Literal["text", "image"]
    layer: int
    projection: Literal["q", "k", "v", "out"]


#: Called at every attention projection while :meth:`VisionLanguageBackbone.adapted` is
#: active: ``hook(site, x, y)`` with the projection's input ``x`` ``[..., in]`` (the normed
#: tokens for q, k and v; the heads' merged attention output for out) and its frozen
#: output ``y = x @ W.T + b`` ``[..., out]``; returns the output to use instead, of ``y``'s
#: shape (e.g. LoRA: ``y + scale * B(A(dropout(x)))``). Return ``y`` itself to leave a
#: site as it is.
ProjectionHook = Callable[[ProjectionSite, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------ backbone

#: What a shared causal text prefix leaves behind for the tokens after it
#: (:meth:`VisionLanguageBackbone.encode_text_prefix`): one ``(keys, values)`` pair per
#: text block, each ``[G, heads, P, head_dim]`` for G prefixes of P tokens. Row g
#: belongs to prefix g, so indexing both tensors of every pair selects prefixes.
TextPrefix = list[tuple[torch.Tensor, torch.Tensor]]


class VisionLanguageBackbone(nn.Module):
    """A frozen CLIP-like model, seen through the parts prompt methods need.

    **Text tower.** ``tokenize`` / ``tokenize_words`` -> ``embed_tokens`` -> (edit the
    embeddings, e.g. write context vectors into slots) -> ``encode_text_embeddings``,
    which adds positions, runs the blocks (with an optional hook before each, for deep
    text prompts), and applies the text head: final norm, the state at
    ``pool_positions(tokens)``, projection (:meth:`text_head`).

    **Image tower** (ViT backbones, ``"vision_transformer" in capabilities``):
    ``embed_image(images, pre_norm=False)`` gives class + patch tokens with positions
    *before* the pre-norm (insert tokens here to have them normalised, as MaPLe
    does); ``vision_pre_norm`` applies it; ``embed_image(images)`` is both steps
    (insert here to skip the norm, as ProVP and VPT do). ``encode_image_tokens``
    runs the blocks (hook before each) and the image head (:meth:`image_head`:
    pooling at the class token, final norm, projection). ``encode_image`` is the
    whole frozen path and equals the model's own image encoder.

    Widths and depths are attributes read from the model. The backbone is frozen
    and stays in eval mode whatever its parent module does.
    """

    embed_dim: int
    text_width: int
    text_depth: int
    vision_width: int
    vision_depth: int
    context_length: int
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    #: ``logit_scale.exp()``, a plain float (frozen).
    logit_scale: float
    sot_id: int
    eot_id: int
    #: What this backbone offers beyond features: ``"vision_transformer"`` when the
    #: image tower is a ViT whose tokens and blocks are reachable (visual prompts);
    #: ``"projection_hooks"`` when :meth:`adapted` works (every attention projection of
    #: both towers reachable: weights trained inside the towers, e.g. LoRA).
    capabilities: frozenset[str] = frozenset()
    #: A short description for messages, e.g. ``"ViT-B-16 (open_clip)"``.
    description: str = ""
    #: Whether :meth:`encode_text_prefix` and :meth:`encode_text_suffix` work: the text
    #: tower is causal and pools at a token after the prefix, so prompts that begin with
    #: the same tokens can share one pass over them (a CoOp prompt table runs its start
    #: token and context once, not once per class).
    text_prefix_sharing: bool = False

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` with start/end tokens, zero-padded."""
        raise NotImplementedError

    def tokenize_words(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        raise NotImplementedError

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen token embeddings ``[..., text_width]`` of ``tokens``."""
        raise NotImplementedError

    #: ``[context_length, text_width]`` text positional embedding.
    positional_embedding: torch.Tensor

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text pooling rule: index ``[N]`` of the token whose final state is the
        text feature of each sequence (e.g. the end token for CLIP)."""
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen text features ``[N, embed_dim]`` of token ids (not normalised)."""
        raise NotImplementedError

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        block_hook: BlockHook | None = None,
        add_positional: bool = True,
        context: BlockContext | None = None,
    ) -> torch.Tensor:
        """Text features ``[N, embed_dim]`` from token embeddings ``[N, L, text_width]``.

        ``tokens`` ``[N, L]`` are the ids the embeddings stand for; they decide the
        pooled position. ``block_hook(l, x)`` is called before block ``l`` and may
        replace token states but must keep the shape (a different shape raises
        :class:`ContractError`): pooling reads positions from ``tokens``. The tower is
        causal, so sequences may be cut after the last pooled position before the
        blocks run; hooks see that length. A :class:`ContextHook` gets ``context``
        (what the rows hold, cut to that length; ``BlockContext("text")`` when None).
        """
        raise NotImplementedError

    def text_head(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm, the state at ``pool_positions(tokens)``, projection: ``[N, embed_dim]``."""
        raise NotImplementedError

    def encode_text_prefix(
        self, prefix: torch.Tensor, block_hook: BlockHook | None = None, context: BlockContext | None = None
    ) -> TextPrefix:
        """Run the text blocks over G shared prompt beginnings ``prefix``
        ``[G, P, text_width]`` (token embeddings with positions): what each block's
        attention needs of them for the tokens that follow (see :data:`TextPrefix`).
        ``block_hook`` is called before each block as in :meth:`encode_text_embeddings`
        (a :class:`ContextHook` gets ``context``, ``part="prefix"``); it changes the
        prefix only, never the suffixes. Only with :attr:`text_prefix_sharing`."""
        raise NotImplementedError

    def encode_text_suffix(self, prefix: TextPrefix, suffix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text features ``[G, C, embed_dim]`` of the prompts that begin with prefix g
        (:meth:`encode_text_prefix`, P tokens) and continue with ``suffix[g, c]``
        ``[G, C, S, text_width]`` (token embeddings with positions P, P+1, ...).

        ``tokens`` ``[C, >= P]`` are the ids of the whole prompts (prefix included);
        they decide the pooled positions, which must lie in the suffix. The features
        equal :meth:`encode_text_embeddings` of the whole prompts, up to rounding, and
        so do the gradients. Only with :attr:`text_prefix_sharing`.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- vision
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen image features ``[B, embed_dim]`` (not normalised)."""
        raise NotImplementedError

    def embed_image(self, images: torch.Tensor, pre_norm: bool = True) -> torch.Tensor:
        """Class token then patch tokens, with positions: ``[B, 1 + P, vision_width]``;
        after the pre-norm unless ``pre_norm=False``."""
        raise NotImplementedError

    def vision_pre_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The norm applied to the image tokens before the first block."""
        raise NotImplementedError

    def encode_image_tokens(
        self, tokens: torch.Tensor, block_hook: BlockHook | None = None, context: BlockContext | None = None
    ) -> torch.Tensor:
        """Run the image blocks on ``tokens`` ``[B, T, vision_width]`` and the image head.

        ``block_hook(l, x)`` is called before block ``l``; it may insert, replace or
        remove tokens (the sequence length may change) but must keep the class token
        at index 0, the batch size and the width (a different batch size or width
        raises :class:`ContractError`). A :class:`ContextHook` gets ``context``
        (``BlockContext("image", groups=arange(B))`` when None).
        """
        raise NotImplementedError

    def image_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooling at the class token, final norm, projection: ``[B, embed_dim]``."""
        raise NotImplementedError

    # ------------------------------------------------------ projection hooks
    @contextmanager
    def adapted(self, hook: ProjectionHook) -> Iterator[None]:
        """Inside ``with backbone.adapted(hook):`` every attention projection (q, k, v and
        out) of every block of both towers passes through ``hook`` (:data:`ProjectionHook`),
        in every path: :meth:`encode_text`, :meth:`encode_text_embeddings`, the shared-prefix
        pass (:meth:`encode_text_prefix` / :meth:`encode_text_suffix`), :meth:`encode_image`
        and :meth:`encode_image_tokens`. The frozen weights are read, never written: what a
        method trains lives in its own tensors, which the hook reads (their gradients flow
        through the returned outputs). Outside, the backbone is exactly as before.

        Only with ``"projection_hooks" in capabilities``. An inner ``adapted`` replaces the
        outer hook until it exits. A pass recomputed in the backward pass (activation
        checkpointing) reads the hook active then: run that backward inside ``adapted``
        too."""
        self.require("projection_hooks", "backbone.adapted (a projection hook)")
        if not callable(hook):
            raise ContractError(f"backbone.adapted needs a callable hook(site, x, y), got {type(hook).__name__}")
        previous = self.__dict__.get("_projection_hook")
        self.__dict__["_projection_hook"] = hook
        try:
            yield
        finally:
            self.__dict__["_projection_hook"] = previous

    @property
    def projection_hook(self) -> ProjectionHook | None:
        """The hook of the innermost active :meth:`adapted` block; None outside (for
        backbone implementations)."""
        return self.__dict__.get("_projection_hook")

    def require(self, capability: str, who: str) -> None:
        """Raise a one-line :class:`~vlprompt_core.errors.UserError` naming ``who``
        unless this backbone has ``capability``."""
        if capability not in self.capabilities:
            what = {
                "vision_transformer": "a ViT image tower (visual prompts go into its blocks)",
                "projection_hooks": "attention projections reachable in both towers (weights trained inside them)",
            }.get(capability, capability)
            raise UserError(f"{who} needs {what}; backbone {self.description or type(self).__name__} has none")
