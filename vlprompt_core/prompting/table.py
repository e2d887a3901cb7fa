"""A :class:`~vlprompt_core.prompting.learned.PromptTemplate` laid out for a list of class
names (:class:`PromptTable`: token ids, context slots, frozen embeddings) and the text pass
that writes context vectors into it: the tokens every class shares run once per leading
index, the rest per class, in chunks recomputed in the backward pass."""

from __future__ import annotations

import copy

import torch
from torch import nn

from vlprompt_kernels import assemble_prompts

from .. import textbook
from ..api import BlockContext, BlockHook, ContextHook, TextPrefix, VisionLanguageBackbone
from ..errors import UserError
from .chunking import _in_chunks, rows_per_pass
from .handcrafted import prompt_length_problem
from .learned import PromptTemplate
from .sharding import current_class_sharding, shard_classes


class PromptTable(nn.Module):
    """A template laid out for a list of class names (buffers move with the method).

    ``token_ids`` ``[C, L]`` (zero-padded to the longest prompt), ``slots``
    ``[C, L]`` (-1 outside context slots) and ``embeddings`` ``[C, L, text_width]``
    (the frozen token embeddings, fp32). ``prefix_length`` is the number P of
    leading tokens (ids and context slots) every class's prompt shares, before any
    pooled position, on a backbone with
    :attr:`~vlprompt_core.api.VisionLanguageBackbone.text_prefix_sharing` (0 otherwise).
    """

    def __init__(self, backbone: VisionLanguageBackbone, names: list[str], template: PromptTemplate):
        super().__init__()
        self.template = template
        self.n_ctx = template.n_ctx
        rows = [template.layout(backbone, n) for n in names]
        longest = max(len(ids) for ids, _ in rows)
        problem = prompt_length_problem([(n, template.describe(n), len(ids)) for n, (ids, _) in zip(names, rows)],
                                        backbone.context_length,
                                        "use fewer context vectors (n_ctx), or shorten the class name (classnames)")
        if problem:
            raise UserError(problem)
        device = backbone.positional_embedding.device
        width = backbone.context_length if textbook.active() else longest  # the reference pads to 77
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        slots = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (row_ids, row_slots) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            slots[i, : len(row_slots)] = torch.tensor(row_slots)
        sharing = backbone.text_prefix_sharing and not textbook.active()
        self.prefix_length = self._shared_prefix(backbone, ids, slots) if sharing else 0
        #: Whether every context slot lies in the shared prefix (then a slots-only
        #: :class:`~vlprompt_core.api.ContextHook` keeps the shared-prefix pass).
        self.slots_in_prefix = bool((slots[:, self.prefix_length :] < 0).all())
        ids, slots = ids.to(device), slots.to(device)
        with torch.no_grad():
            embeddings = backbone.embed_tokens(ids).float()
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("slots", slots, persistent=False)
        self.register_buffer("embeddings", embeddings, persistent=False)

    @staticmethod
    def _shared_prefix(backbone: VisionLanguageBackbone, ids: torch.Tensor, slots: torch.Tensor) -> int:
        """Leading positions where every row has row 0's id and slot, cut before the
        first pooled position (the suffix must hold every class's pooled token)."""
        differs = ((ids != ids[:1]) | (slots != slots[:1])).any(0)
        shared = int(differs.int().argmax()) if bool(differs.any()) else ids.shape[1]
        return min(shared, int(backbone.pool_positions(ids).min()))

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def assemble(self, backbone: VisionLanguageBackbone, ctx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings with positions, ``[*S, C, L, text_width]``, from context
        ``ctx`` ``[*S, M, text_width]`` whose leading dims ``S`` broadcast against
        ``[C]``: ``()`` shared, ``(C,)`` per class, ``(B, 1)`` per image, ``(K, B, 1)``
        per sample and image... (:func:`vlprompt_kernels.assemble_prompts`)."""
        return assemble_prompts(self.embeddings, ctx, self.slots, backbone.positional_embedding.float())

    def encode(
        self,
        backbone: VisionLanguageBackbone,
        ctx: torch.Tensor,
        block_hook: BlockHook | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Text features ``[*S, C, embed_dim]`` of the prompts made with ``ctx``.

        When the classes' prompts begin with the same :attr:`prefix_length` >= 2 tokens
        and ``ctx`` does not vary per class (``S`` ends in 1 or is empty) and there is no
        ``block_hook`` (or a slots-only :class:`~vlprompt_core.api.ContextHook` and every
        context slot in the prefix: deep text prompts), the causal text tower runs those
        tokens once per leading index
        (once for a shared context, once per image for ``(B, 1)``) and only the rest of
        each prompt per class (:meth:`~vlprompt_core.api.VisionLanguageBackbone.encode_text_suffix`):
        the same features and gradients as the full pass, with less work.

        Prompts (or prompt suffixes) go through the text tower in passes of at most
        ``chunk_size`` of them; None follows :func:`text_chunking` (``"auto"`` by
        default: :func:`rows_per_pass`). With gradients enabled, chunks are recomputed
        in the backward pass (activation checkpointing), so memory is bounded by one
        chunk and the gradients are those of the single pass. ``block_hook`` sees one
        chunk at a time; a :class:`~vlprompt_core.api.ContextHook` is told its rows'
        classes, groups (the flattened index into ``S``) and context slots
        (:class:`~vlprompt_core.api.BlockContext`), or, on the shared prefix, that the
        rows are the groups' prefixes (``part="prefix"``, no classes).

        In a training step of a distributed run, for a method that opts in
        (:attr:`~vlprompt_core.api.PromptMethod.shards_classes`), each process encodes only
        its slice of the classes and the features are gathered with their gradient
        (:func:`~vlprompt_core.prompting.sharding.shard_classes`), when the context is the
        same in every process and there is no ``block_hook`` (:meth:`_shardable`).
        """
        if current_class_sharding() is not None and self._shardable(ctx, block_hook):
            return shard_classes(len(self), lambda part: self.rows(part).encode(
                backbone, ctx[part] if ctx.dim() == 3 and ctx.shape[0] != 1 else ctx, None, chunk_size))
        recompute = torch.is_grad_enabled() and ctx.requires_grad
        per_class = ctx.dim() > 2 and ctx.shape[-3] != 1
        hook_allows_prefix = block_hook is None or (
            isinstance(block_hook, ContextHook) and block_hook.slots_only and self.slots_in_prefix
        )
        if textbook.active():
            chunk_size = 0  # one pass over every full-length prompt
        elif hook_allows_prefix and self.prefix_length >= 2 and not per_class:
            return self._encode_with_prefix(backbone, ctx, chunk_size, recompute, block_hook)

        prompts = self.assemble(backbone, ctx)
        *lead, n_cls, length, width = prompts.shape
        flat = prompts.reshape(-1, length, width)
        ids = self.token_ids.expand(*lead, n_cls, length).reshape(-1, length)
        rows = rows_per_pass(backbone, length, chunk_size) or flat.shape[0]
        index = torch.arange(flat.shape[0], device=flat.device)  # row = group * C + class

        def run(x, t, r):
            context = None
            if isinstance(block_hook, ContextHook):
                context = BlockContext("text", classes=r % n_cls, groups=r // n_cls, slots=self.slots[r % n_cls])
            return backbone.encode_text_embeddings(x, t, block_hook=block_hook, add_positional=False, context=context)

        pieces = [(flat[i : i + rows], ids[i : i + rows], index[i : i + rows]) for i in range(0, flat.shape[0], rows)]
        feats = torch.cat(_in_chunks(run, recompute, pieces))
        return feats.reshape(*lead, n_cls, feats.shape[-1])

    def _shardable(self, ctx: torch.Tensor, block_hook: BlockHook | None) -> bool:
        """Whether :meth:`encode` may shard its pass over classes (:mod:`.sharding`): a
        trained context shared by every image (``S`` empty, ``(1,)`` or per class ``(C,)``:
        the same in every process), no block hook (it is told its rows' class indices),
        not in textbook mode."""
        shared = ctx.dim() == 2 or (ctx.dim() == 3 and ctx.shape[0] in (1, len(self)))
        return shared and ctx.requires_grad and block_hook is None and not textbook.active()

    def rows(self, classes: slice) -> PromptTable:
        """This table for a slice of its classes: the same layout (width, shared prefix),
        so each class's prompt is encoded as in the whole table."""
        part = copy.copy(self)
        part.__dict__["_buffers"] = {name: buf[classes] for name, buf in self._buffers.items()}
        return part

    def _encode_with_prefix(
        self,
        backbone: VisionLanguageBackbone,
        ctx: torch.Tensor,
        chunk_size: int | None,
        recompute: bool,
        block_hook: BlockHook | None = None,
    ) -> torch.Tensor:
        """:meth:`encode` for a context without a per-class dim: the shared prefix once per
        group ``G = prod(S[:-1])`` (with ``block_hook``, a slots-only :class:`ContextHook`),
        then the class suffixes, chunked over (group, class) rows."""
        lead = ctx.shape[:-3] if ctx.dim() > 2 else ()
        groups = ctx.reshape(-1, 1, *ctx.shape[-2:])  # [G, 1, M, W]
        n_prefix, n_cls, length = self.prefix_length, *self.token_ids.shape
        positional = backbone.positional_embedding.float()
        prefix = assemble_prompts(self.embeddings[:1, :n_prefix], groups, self.slots[:1, :n_prefix], positional)
        suffix = assemble_prompts(
            self.embeddings[:, n_prefix:], groups, self.slots[:, n_prefix:], positional[n_prefix:]
        )  # [G, C, L - P, W]
        n_groups = suffix.shape[0]
        if block_hook is None:  # the one-argument call, which backbones written before prefix hooks take
            state: TextPrefix = backbone.encode_text_prefix(prefix[:, 0])
        else:
            context = BlockContext("text", "prefix", groups=torch.arange(n_groups, device=suffix.device),
                                   slots=self.slots[:1, :n_prefix].expand(n_groups, n_prefix))
            state = backbone.encode_text_prefix(prefix[:, 0], block_hook=block_hook, context=context)
        rows = rows_per_pass(backbone, length - n_prefix, chunk_size) or n_groups * n_cls

        def run(x, g, c):  # suffixes x of groups g and classes c
            return backbone.encode_text_suffix([(k[g], v[g]) for k, v in state], x, self.token_ids[c])

        if rows >= n_cls:  # whole groups per chunk
            step = rows // n_cls
            spans = [(slice(g, g + step), slice(None)) for g in range(0, n_groups, step)]
        else:  # one group, some classes per chunk
            spans = [(slice(g, g + 1), slice(c, c + rows)) for g in range(n_groups) for c in range(0, n_cls, rows)]
        parts = _in_chunks(run, recompute, [(suffix[g, c], g, c) for g, c in spans])
        feats = torch.cat(parts, dim=0 if rows >= n_cls else 1)  # [G, C, D], or [1, G * C, D] group-major
        return feats.reshape(*lead, n_cls, feats.shape[-1])
