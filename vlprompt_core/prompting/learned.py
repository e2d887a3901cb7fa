"""Learned prompts: :class:`PromptTemplate` (pieces: :class:`Context` slots, the class
name, fixed words) and the context vectors' first values (:func:`init_context`,
:func:`leading_words`). A template laid out for a class list, and the text pass that
writes context vectors in, is :class:`~vlprompt_core.prompting.table.PromptTable`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ..api import VisionLanguageBackbone
from ..errors import UserError


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
        for one class name, start and end tokens included.

        The ids are those of tokenising the prompt as one string, as the reference code
        does (``"X X X X " + name + "."``): fixed words are tokenised apart, but the name is
        tokenised together with the words right after it (``"{}", "."`` is ``"{}."``), since
        CLIP's BPE merges a run of punctuation: "kite (bird of prey)." ends in one ``")."``
        token. The first ``len(tokenize_words(name))`` of those tokens go where the name
        is, the rest where the words are. With context vectors right after the name
        (CoOp's ``middle`` and ``front``) the name is tokenised alone and the ``"."`` keeps
        its place before the end token. (The reference cuts the name out of the ``end``
        prompt's tokens there, so for such names it moves the merged ``")."`` before the
        context and ends the prompt without a ``"."``; see the CoOp plug-in's README.)
        """
        at = self.pieces.index(CLASS_NAME)
        words = {i: backbone.tokenize_words(name if i == at else p) for i, p in enumerate(self.pieces)
                 if isinstance(p, str)}
        after = at + 1  # the piece right after the name, when it is words
        if after in words:
            text = self.pieces[after]  # joined to the name as in "{}.", with a space before a word
            joined = backbone.tokenize_words(name + (" " if text[:1].isalnum() else "") + text)
            words[at], words[after] = joined[: len(words[at])], joined[len(words[at]) :]

        placeholder = backbone.tokenize_words("X")[0]  # what the context slots hold
        ids, slots = [backbone.sot_id], [-1]
        for i, piece in enumerate(self.pieces):
            if isinstance(piece, Context):
                ids += [placeholder] * (piece.stop - piece.start)
                slots += list(range(piece.start, piece.stop))
            else:
                ids += words[i]
                slots += [-1] * len(words[i])
        return ids + [backbone.eot_id], slots + [-1]

    def describe(self, name: str) -> str:
        """The prompt for class ``name`` as text, context slots shown as ``[N context vectors]``."""
        text = ""
        for p in self.pieces:
            word = f"[{p.stop - p.start} context vectors]" if isinstance(p, Context) else name if p == CLASS_NAME else p
            text += (" " if text and word[:1].isalnum() or word[:1] == "[" else "") + word  # "." joins the name
        return text.strip()

    def __repr__(self) -> str:
        return f"PromptTemplate{self.pieces!r}"


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


def leading_words_problem(word_tokens: Callable[[str], int], phrase: str, n_ctx: int) -> str | None:
    """Why the first ``n_ctx`` tokens of ``phrase`` cannot be learned with the rest kept
    as words (:func:`leading_words`), or None. ``word_tokens(text)`` counts a text's BPE
    tokens without start and end tokens (e.g. ``BackboneInfo.word_tokens``)."""
    words = phrase.split()
    total = word_tokens(" ".join(words)) if words else 0
    if not 1 <= n_ctx <= total:
        return f"n_ctx {n_ctx} must be between 1 and the {total} tokens of ctx_init {phrase!r}"
    ends = [word_tokens(" ".join(words[:k])) for k in range(1, len(words) + 1)]
    if n_ctx not in ends:
        cut = next(w for w, end in zip(words, ends) if end > n_ctx)
        return (f"n_ctx {n_ctx} ends inside the word {cut!r} of ctx_init {phrase!r}; the first n_ctx tokens "
                f"must be whole words (word ends at {', '.join(map(str, ends))} tokens)")
    return None


def leading_words(
    backbone: VisionLanguageBackbone, phrase: str, n_ctx: int, suffix: str = "."
) -> tuple[PromptTemplate, torch.Tensor]:
    """Learn the first ``n_ctx`` tokens of ``phrase`` and keep the rest as words (MaPLe,
    IVLP): the template ``[n_ctx context vectors] <rest of the phrase> {} <suffix>`` and
    the initial context ``[n_ctx, text_width]`` (the frozen embeddings of those tokens).

    >>> leading_words(bb, "a photo of a", 2)   # [SOS] [ctx ctx] of a {class} . [EOT]
    (PromptTemplate(Context(0, 2), 'of a', '{}', '.'), <embeddings of "a photo">)

    A :class:`UserError` when ``n_ctx`` exceeds the phrase's tokens or ends inside a word
    (:func:`leading_words_problem`).
    """
    def count(text: str) -> int:
        return len(backbone.tokenize_words(text))

    problem = leading_words_problem(count, phrase, n_ctx)
    if problem:
        raise UserError(f"method: {problem}")
    words = phrase.split()
    k = next(k for k in range(1, len(words) + 1) if count(" ".join(words[:k])) == n_ctx)
    rest = " ".join(words[k:])
    template = PromptTemplate(Context(0, n_ctx), *([rest] if rest else []), CLASS_NAME, suffix)
    return template, init_context(backbone, n_ctx, " ".join(words[:k]))
