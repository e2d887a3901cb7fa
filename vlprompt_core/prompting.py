"""Shared text-prompt machinery for method plug-ins.

* :class:`PromptTemplate` — a prompt as pieces: learned context slots
  (:class:`Context`), the class name (``"{}"``) and fixed words.
* :class:`PromptTable` — a template laid out for a class list: token ids, the
  slot map that says where each context vector goes, and the frozen token
  embeddings; :meth:`PromptTable.encode` writes context vectors in (any leading
  shape: shared, per class, per image, per Monte-Carlo sample...) and runs the
  text tower, optionally in chunks.
* :func:`init_context` — context vectors from words or random.
* :func:`class_text_features` — frozen hand-crafted class features (one template
  or an ensemble), as zero-shot CLIP and methods' priors use them.

Image-independent features are cached per evaluation with
:meth:`vlprompt_core.api.PromptMethod.cached`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlprompt_kernels import assemble_prompts

from .api import BlockHook, ClassSet, VisionLanguageBackbone
from .errors import UserError

#: The 7 templates the reference ``ZeroshotCLIP2`` averages (with the dataset's own).
ENSEMBLE_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

#: ``"dataset"`` (the dataset's first template), ``"ensemble"`` (the dataset's prompt
#: ensemble, see :func:`templates_for`), or a list of templates with ``{}``.
TemplateChoice = Union[Literal["dataset", "ensemble"], list[str]]


def templates_for(choice: TemplateChoice, classes: ClassSet) -> list[str]:
    """The hand-written templates ``choice`` stands for on ``classes``.

    ``"ensemble"`` is ``classes.ensemble`` when the dataset names one (its spec
    file's ``ensemble:``, e.g. the reference ``ZeroshotCLIP2``'s 7 templates alone for
    ImageNet, the 7 plus the dataset's own template elsewhere), else the dataset's
    templates followed by :data:`ENSEMBLE_TEMPLATES`.
    """
    if choice == "dataset":
        return classes.templates[:1]
    if choice == "ensemble":
        if classes.ensemble:
            return list(dict.fromkeys(classes.ensemble))
        return list(dict.fromkeys(classes.templates + ENSEMBLE_TEMPLATES))
    return list(choice)


def check_templates(value):
    """A validator for :data:`TemplateChoice` option fields: every template needs ``{}``."""
    if isinstance(value, list):
        bad = [t for t in value if "{}" not in t]
        if bad or not value:
            raise ValueError(f"each template needs a '{{}}' for the class name: {bad or 'empty list'}")
    return value


@torch.no_grad()
def class_text_features(backbone: VisionLanguageBackbone, names: list[str], templates: list[str]) -> torch.Tensor:
    """Frozen class features: the mean over templates of normalised text features,
    re-normalised: ``[C, embed_dim]`` (fp32)."""
    device = backbone.positional_embedding.device
    feats = []
    for template in templates:
        tokens = backbone.tokenize([template.format(n) for n in names]).to(device)
        feats.append(F.normalize(backbone.encode_text(tokens).float(), dim=-1))
    return F.normalize(torch.stack(feats).mean(0), dim=-1)


# ------------------------------------------------------------------ templates


@dataclass(frozen=True)
class Context:
    """Context vectors ``start`` .. ``stop - 1`` at this place in a prompt."""

    start: int
    stop: int

    def __post_init__(self):
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"Context({self.start}, {self.stop}) is not a range")


CLASS_NAME = "{}"


class PromptTemplate:
    """A prompt as a sequence of pieces: :class:`Context` slots, :data:`CLASS_NAME`
    (``"{}"``) and fixed words. Start and end tokens are added around it.

    >>> PromptTemplate(Context(0, 4), "{}", ".")            # CoOp, class at the end
    >>> PromptTemplate(Context(0, 2), "of a", "{}", ".")    # MaPLe: 2 learned words
    """

    def __init__(self, *pieces: Context | str):
        if sum(p == CLASS_NAME for p in pieces) != 1:
            raise ValueError("a prompt template needs the class name '{}' exactly once")
        self.pieces = pieces

    @property
    def n_ctx(self) -> int:
        return max((p.stop for p in self.pieces if isinstance(p, Context)), default=0)

    @classmethod
    def with_context(cls, n_ctx: int, position: Literal["end", "middle", "front"] = "end", suffix: str = "."):
        """``[ctx] {} .`` with the class name after (``end``), in the middle of
        (first ``n_ctx // 2`` vectors before it) or before (``front``) the context."""
        if position == "end":
            return cls(Context(0, n_ctx), CLASS_NAME, suffix)
        if position == "front":
            return cls(CLASS_NAME, Context(0, n_ctx), suffix)
        half = n_ctx // 2
        return cls(Context(0, half), CLASS_NAME, Context(half, n_ctx), suffix)

    def layout(self, backbone: VisionLanguageBackbone, name: str) -> tuple[list[int], list[int]]:
        """Token ids and slots (``j`` for context vector j, -1 otherwise) of the prompt
        for one class name, start and end tokens included."""
        placeholder = backbone.tokenize_words("X")[0]  # what the context slots hold
        ids, slots = [backbone.sot_id], [-1]
        for piece in self.pieces:
            if isinstance(piece, Context):
                ids += [placeholder] * (piece.stop - piece.start)
                slots += list(range(piece.start, piece.stop))
            else:
                words = backbone.tokenize_words(name if piece == CLASS_NAME else piece)
                ids += words
                slots += [-1] * len(words)
        return ids + [backbone.eot_id], slots + [-1]

    def __repr__(self) -> str:
        return f"PromptTemplate{self.pieces!r}"


class PromptTable(nn.Module):
    """A template laid out for a list of class names (buffers move with the method).

    ``token_ids`` ``[C, L]`` (zero-padded to the longest prompt), ``slots``
    ``[C, L]`` (-1 outside context slots) and ``embeddings`` ``[C, L, text_width]``
    (the frozen token embeddings, fp32).
    """

    def __init__(self, backbone: VisionLanguageBackbone, names: list[str], template: PromptTemplate):
        super().__init__()
        self.template = template
        self.n_ctx = template.n_ctx
        rows = [template.layout(backbone, n) for n in names]
        longest = max(len(ids) for ids, _ in rows)
        if longest > backbone.context_length:
            raise UserError(
                f"method: prompts of {longest} tokens exceed the context length {backbone.context_length} "
                "(fewer context vectors, or shorter class names)"
            )
        device = backbone.positional_embedding.device
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        slots = torch.full((len(rows), longest), -1, dtype=torch.long)
        for i, (row_ids, row_slots) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            slots[i, : len(row_slots)] = torch.tensor(row_slots)
        ids, slots = ids.to(device), slots.to(device)
        with torch.no_grad():
            embeddings = backbone.embed_tokens(ids).float()
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("slots", slots, persistent=False)
        self.register_buffer("embeddings", embeddings, persistent=False)

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

        All prompts go through the text tower in one pass, or in passes of at most
        ``chunk_size`` prompts; with gradients enabled, chunks are recomputed in the
        backward pass (activation checkpointing), so memory is bounded by one chunk
        and the gradients are those of the single pass. ``block_hook`` sees one
        chunk at a time.
        """
        prompts = self.assemble(backbone, ctx)
        *lead, n_cls, length, width = prompts.shape
        flat = prompts.reshape(-1, length, width)
        ids = self.token_ids.expand(*lead, n_cls, length).reshape(-1, length)

        def run(x, t):
            return backbone.encode_text_embeddings(x, t, block_hook=block_hook, add_positional=False)

        if chunk_size is None or flat.shape[0] <= chunk_size:
            feats = run(flat, ids)
        else:
            recompute = torch.is_grad_enabled() and flat.requires_grad
            parts = []
            for i in range(0, flat.shape[0], chunk_size):
                x, t = flat[i : i + chunk_size], ids[i : i + chunk_size]
                parts.append(checkpoint(run, x, t, use_reentrant=False) if recompute else run(x, t))
            feats = torch.cat(parts)
        return feats.reshape(*lead, n_cls, feats.shape[-1])


def init_context(
    backbone: VisionLanguageBackbone,
    n_ctx: int,
    words: str = "",
    std: float = 0.02,
    per_class: int | None = None,
) -> torch.Tensor:
    """Initial context vectors (fp32): the frozen token embeddings of ``words``
    (then M = their BPE token count), or ``N(0, std²)`` of shape ``[M, width]``, or
    ``[per_class, M, width]`` for class-specific context."""
    device = backbone.positional_embedding.device
    if words:
        if per_class is not None:
            raise UserError("method: class-specific context starts from random vectors, not from words")
        ids = torch.tensor(backbone.tokenize_words(words), device=device)
        with torch.no_grad():
            return backbone.embed_tokens(ids).float().clone()
    shape = (per_class, n_ctx, backbone.text_width) if per_class is not None else (n_ctx, backbone.text_width)
    return torch.empty(shape, device=device).normal_(0, std)
