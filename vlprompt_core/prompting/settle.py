"""How many context vectors a method with ``n_ctx`` and ``ctx_init`` options actually
learns (:func:`settle_context`), told before anything is built: with words,
:func:`~vlprompt_core.prompting.init_context` makes one vector per token of them, so
``n_ctx`` is ignored (as in the reference CoOp code)."""

from __future__ import annotations

from ..api import BackboneInfo, EffectiveOptions, Options
from ..errors import UserError


def settle_context(options: Options, backbone: BackboneInfo, n_field: str = "n_ctx",
                   words_field: str = "ctx_init") -> EffectiveOptions:
    """The options with ``n_ctx`` the token count of ``ctx_init`` (when set and the
    backbone can count tokens), with a note when that differs from the default; a
    one-line :class:`UserError` when the spec or recipe wrote an ``n_ctx`` that the
    words contradict (it would be ignored)."""
    words, n_ctx = getattr(options, words_field), getattr(options, n_field)
    if not words or backbone.word_tokens is None:
        return EffectiveOptions(options)
    count = backbone.word_tokens(words)
    if count == n_ctx:
        return EffectiveOptions(options)
    if n_field in options.model_fields_set:
        raise UserError(f"method.{n_field}: {n_ctx}, but {words_field} {words!r} makes {count} context vectors "
                        f"(one per token); drop {n_field}, or set {words_field}: '' for {n_ctx} random vectors")
    return EffectiveOptions(options.model_copy(update={n_field: count}),
                            (f"{n_field} {count}: one context vector per token of {words_field} {words!r}",))
