"""What every part of the contract shares: the base of plug-in options models, the
error a plug-in raises when it breaks the contract, and :class:`BackboneInfo` (what a
backbone is, told before its weights load)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    """Base of every plug-in's options model: unknown keys are errors, not ignored,
    and so are infinite or NaN floats."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ContractError(RuntimeError):
    """A plug-in broke the contract it signed (e.g. a text block hook changed the
    sequence length). A bug in the plug-in, not a mistake of the user."""


#: The :class:`BackboneInfo` fields a recipe rule may match (:class:`~vlprompt_core.api.RecipeCondition`).
MATCHED_PROPERTIES = ("family", "text_depth", "text_width", "vision_depth", "vision_width")


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone is: its architecture's name, depths and widths, told *without
    loading weights* by its entry (:attr:`~vlprompt_core.api.BackboneEntry.info`) for
    ``vlprompt validate`` and recipe rules, or read from a built backbone
    (:meth:`of`) when a run starts. A field is None where it cannot be told cheaply;
    whoever reads it keeps what was asked for then.

    ``family`` is the architecture's name as the backbone plug-in names it (open_clip:
    the model name, e.g. ``ViT-B-16``; a config file's or OpenAI checkpoint's file
    stem). ``word_tokens(text)`` counts the tokens of ``text`` without the start and
    end tokens (e.g. to tell how many context vectors ``ctx_init`` makes).
    """

    family: str | None = None
    text_depth: int | None = None
    text_width: int | None = None
    vision_depth: int | None = None
    vision_width: int | None = None
    context_length: int | None = None
    embed_dim: int | None = None
    capabilities: frozenset[str] | None = None
    word_tokens: Callable[[str], int] | None = None

    @classmethod
    def of(cls, backbone: Any, known: BackboneInfo | None = None) -> BackboneInfo:
        """What a built backbone says of itself; fields it cannot say (``family``, when
        it has no such attribute) are taken from ``known``."""
        known = known or cls()

        def words(text: str) -> int:
            return len(backbone.tokenize_words(text))

        return replace(
            known,
            family=getattr(backbone, "family", None) or known.family,
            text_depth=backbone.text_depth, text_width=backbone.text_width,
            vision_depth=backbone.vision_depth, vision_width=backbone.vision_width,
            context_length=backbone.context_length, embed_dim=backbone.embed_dim,
            capabilities=frozenset(backbone.capabilities), word_tokens=words,
        )

    def matched(self) -> dict[str, Any]:
        """What recipe rules match (:data:`MATCHED_PROPERTIES`)."""
        return {name: getattr(self, name) for name in MATCHED_PROPERTIES}

    def describe(self) -> dict[str, Any]:
        """Plain data for ``results.json`` (``word_tokens`` left out)."""
        out = {k: getattr(self, k) for k in ("family", "text_depth", "text_width", "vision_depth", "vision_width",
                                            "context_length", "embed_dim")}
        out["capabilities"] = sorted(self.capabilities) if self.capabilities is not None else None
        return out
