"""The backbone itself: :class:`OpenClipBackbone`, a frozen open_clip model seen
through :class:`~vlprompt_core.api.VisionLanguageBackbone`: its sizes and
capabilities read from the model, tokenizing, the text pass (whole, or as a
shared prefix and per-class suffixes) and the vision pass piece by piece, for
prompt methods to step in between. The blocks it runs by hand are in
:mod:`.blocks`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ... import textbook
from ...api import BlockContext, TextPrefix, VisionLanguageBackbone
from ...errors import UserError
from .blocks import _hooked, _plain_blocks, _prefix_block, _run_blocks, _shares_prefixes, _suffix_block
from .options import OPENAI_MEAN, OPENAI_STD


class OpenClipBackbone(VisionLanguageBackbone):
    """A frozen open_clip ``CLIP`` (or ``CustomTextCLIP`` with open_clip's text tower).

    Everything goes through public module attributes of open_clip's
    ``TextTransformer`` and ``VisionTransformer`` (token/positional embeddings,
    ``conv1``, ``class_embedding``, ``ln_pre``, ``transformer.resblocks``,
    ``ln_post``, ``proj``...), never its private helpers; the tests check that the
    pieces put together equal open_clip's own ``encode_text``/``encode_image``.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, name: str = ""):
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self._tokenizer = tokenizer
        text = getattr(model, "text", model)
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        missing = [a for a in needed if not hasattr(text, a)]
        if missing:
            raise UserError(
                f"backbone.model: text tower {type(text).__name__} lacks {', '.join(missing)}; "
                "prompt methods need an open_clip TextTransformer"
            )
        self.text = text
        self.pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        self._eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        self.visual = model.visual

        self.embed_dim = int(getattr(self.visual, "output_dim", 0) or model.text_projection.shape[-1])
        self.text_width = int(text.token_embedding.weight.shape[1])
        self.text_depth = len(text.transformer.resblocks)
        vt = getattr(self.visual, "transformer", None)
        self.vision_width = int(vt.width) if vt is not None else 0
        self.vision_depth = len(vt.resblocks) if vt is not None else 0
        self.context_length = int(text.positional_embedding.shape[0])
        cfg = getattr(self.visual, "preprocess_cfg", {})
        size = cfg.get("size", getattr(self.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.image_mean = tuple(cfg.get("mean", getattr(self.visual, "image_mean", None) or OPENAI_MEAN))
        self.image_std = tuple(cfg.get("std", getattr(self.visual, "image_std", None) or OPENAI_STD))
        self.logit_scale = float(model.logit_scale.exp().item())
        inner = getattr(tokenizer, "tokenizer", tokenizer)
        self.sot_id = int(getattr(inner, "sot_token_id", 49406))
        self.eot_id = int(getattr(inner, "eot_token_id", self._eos_id or 49407))
        self._encode_words = getattr(inner, "encode", None)
        vit = all(hasattr(self.visual, a) for a in ("conv1", "class_embedding", "positional_embedding", "ln_pre",
                                                     "transformer", "ln_post"))
        vit = vit and getattr(self.visual, "attn_pool", None) is None and getattr(self.visual, "pool_type", "tok") == "tok"
        # projection hooks (adapted): every block of both towers redone by hand
        hooks = vit and _plain_blocks(text.transformer) and _plain_blocks(self.visual.transformer)
        self.capabilities = frozenset({"vision_transformer"} if vit else ()) | frozenset(
            {"projection_hooks"} if hooks else ())
        self.text_prefix_sharing = _shares_prefixes(text, self.pool_type)
        self.description = f"{name or type(model).__name__} ({type(self.visual).__name__} image tower)"

    def train(self, mode: bool = True):
        """The backbone stays in eval mode whatever the parent module does."""
        return super().train(False)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts, context_length=self.context_length)

    def tokenize_words(self, text: str) -> list[int]:
        if self._encode_words is None:
            raise UserError("backbone: this tokenizer cannot encode words without special tokens")
        return list(self._encode_words(text))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.token_embedding(tokens)

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self.text.positional_embedding

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self._eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full(tokens.shape[:1], tokens.shape[1] - 1, device=tokens.device)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[:1], dtype=torch.long, device=tokens.device)
        raise UserError(f"backbone: text pooling {self.pool_type!r} is not supported")

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text_embeddings(self.embed_tokens(tokens), tokens)

    def encode_text_embeddings(self, embeddings, tokens, block_hook=None, add_positional=True, context=None):
        text = self.text
        cast = self._text_cast(embeddings)
        x = embeddings.to(cast)
        mask = text.attn_mask
        if mask is not None and self.pool_type in ("argmax", "eos") and not textbook.active():
            # causal: the pooled state depends only on the tokens up to it
            length = int(self.pool_positions(tokens).max()) + 1
            x, tokens = x[:, :length], tokens[:, :length]
            mask = mask[:length, :length]
        length = x.shape[1]
        if add_positional:
            x = x + text.positional_embedding[:length].to(cast)
        context = (context or BlockContext("text")).cut(length)
        x = _run_blocks(text.transformer, x, mask, block_hook, context, keep_length=True,
                        projection_hook=self.projection_hook)
        return self.text_head(x, tokens)

    def text_head(self, hidden, tokens):
        # the pooled token first, then the (per-token) final norm: the same numbers, less work
        x = hidden[torch.arange(hidden.shape[0], device=hidden.device), self.pool_positions(tokens)]
        return self._text_output(x)

    def _text_output(self, x):
        """Final norm and projection of pooled states ``[..., text_width]``."""
        x = self.text.ln_final(x)
        proj = self.text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text_prefix(self, prefix: torch.Tensor, block_hook=None, context=None) -> TextPrefix:
        """Each block runs on the prefixes as in the full pass (causal mask over P tokens);
        its keys and values are projected once per prefix, for all the suffixes."""
        x = prefix.to(self._text_cast(prefix))
        mask = self.text.attn_mask[: x.shape[1], : x.shape[1]]
        context = context or BlockContext("text", "prefix")
        states = []
        hook = self.projection_hook
        for i, block in enumerate(self.text.transformer.resblocks):
            if block_hook is not None:
                x = _hooked(block_hook, i, x, context, keep_length=True)
            x, keys, values = _prefix_block(block, x, mask, hook, i)
            states.append((keys, values))
        return states

    def encode_text_suffix(self, prefix: TextPrefix, suffix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Every block by hand from its public parts (``ln_1``, ``attn``'s projections,
        ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``): the suffix tokens attend to their
        prefix's keys and values, never copied per class, and causally to each other."""
        n_prefix = prefix[0][0].shape[2]
        pool = self.pool_positions(tokens) - n_prefix  # [C], positions in the suffix
        length = int(pool.max()) + 1  # causal: nothing after the last pooled token matters
        x = suffix[:, :, :length].to(self._text_cast(suffix))
        mask = self.text.attn_mask[n_prefix : n_prefix + length, : n_prefix + length]
        hook = self.projection_hook
        for i, (block, (keys, values)) in enumerate(zip(self.text.transformer.resblocks, prefix)):
            x = _suffix_block(block, x, keys, values, mask, hook, i)
        pooled = x[:, torch.arange(x.shape[1], device=x.device), pool]  # [G, C, W]
        return self._text_output(pooled)

    def _text_cast(self, x):
        transformer = self.text.transformer
        return transformer.get_cast_dtype() if hasattr(transformer, "get_cast_dtype") else x.dtype

    # ---------------------------------------------------------------- vision
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.projection_hook is not None:  # the blocks by hand, projections through the hook
            return self.encode_image_tokens(self.embed_image(images))
        return self.visual(images)

    def _vit(self):
        self.require("vision_transformer", "this operation")
        return self.visual

    def embed_image(self, images, pre_norm=True):
        v = self._vit()
        x = v.conv1(images)  # [B, W, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, P, W]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)  # identity in eval mode (the backbone always is)
        return v.ln_pre(x) if pre_norm else x

    def vision_pre_norm(self, tokens):
        return self._vit().ln_pre(tokens)

    def encode_image_tokens(self, tokens, block_hook=None, context=None):
        v = self._vit()
        context = context or BlockContext("image", groups=torch.arange(tokens.shape[0], device=tokens.device))
        x = _run_blocks(v.transformer, tokens, None, block_hook, context, keep_length=False,
                        projection_hook=self.projection_hook)
        return self.image_head(x)

    def image_head(self, tokens):
        v = self._vit()
        pooled = v.ln_post(tokens[:, 0])  # a per-token norm: the same before or after pooling
        return pooled @ v.proj if v.proj is not None else pooled
