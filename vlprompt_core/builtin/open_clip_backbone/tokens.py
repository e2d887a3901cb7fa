"""How long a text is for an open_clip model, told without loading its weights: its
tokenizer and the text context of its config (``BackboneEntry.text_context``, with
which ``vlprompt validate`` checks prompts before a run)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from . import configs
from .checkpoints import _is_torchscript
from .options import OpenClipOptions
from .pretrained import _checkpoint_path, _model_config, check_open_clip

#: The tokenizer every OpenAI CLIP uses (registered under any OpenAI name), and its text context.
OPENAI_TOKENIZER, OPENAI_CONTEXT = "ViT-B-32", 77


@functools.lru_cache(maxsize=8)
def _encoder(name: str) -> Callable[[str], list[int]] | None:
    tokenizer = configs.tokenizer(name)
    return getattr(getattr(tokenizer, "tokenizer", tokenizer), "encode", None)


def open_clip_text_context(opts: OpenClipOptions) -> tuple[Callable[[str], int], int] | None:
    """``(count, context_length)`` of the model ``opts`` names (see
    :class:`~vlprompt_core.api.BackboneEntry`); None when the options are wrong (their
    check says why) or telling would need the network (a tokenizer from the hub)."""
    import open_clip

    if check_open_clip(opts):
        return None
    checkpoint = _checkpoint_path(opts)
    if checkpoint is not None and (opts.format == "openai" or (opts.format == "auto" and _is_torchscript(checkpoint))):
        name, context = OPENAI_TOKENIZER, OPENAI_CONTEXT
    else:
        name = opts.model
        config = _model_config(opts)
        if config is not None:
            name = configs.register_model_config(config)  # as making the model does
        text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg")
        if not text_cfg or text_cfg.get("hf_tokenizer_name"):
            return None
        context = int(text_cfg.get("context_length", OPENAI_CONTEXT))
    encode = _encoder(name)
    if encode is None:
        return None
    return (lambda text: len(encode(text)) + 2), context
