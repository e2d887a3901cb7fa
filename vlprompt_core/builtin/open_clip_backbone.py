"""The ``open_clip`` backbone: any open_clip model, frozen, seen through
:class:`~vlprompt_core.api.VisionLanguageBackbone`.

Weights come from a pretrained tag (the user's cache or the hub), a local
checkpoint file (open_clip format, or an original OpenAI CLIP archive / state
dict as the reference research code loads), the project's embedded tiny CLIP
(``pretrained: embedded``), or nowhere (random init, for tests).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .. import hookimpl, textbook
from ..api import BackboneEntry, ContractError, Options, TextPrefix, VisionLanguageBackbone
from ..embedded import pretrain as embedded
from ..errors import UserError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: The embedded default: a tiny CLIP pretrained by ``python -m vlprompt_core.embedded.pretrain``.
EMBEDDED_MODEL = embedded.MODEL_NAME
EMBEDDED_CONFIG = embedded.CONFIG_PATH
EMBEDDED_WEIGHTS = embedded.weights_path()


class OpenClipOptions(Options):
    """``backbone: {name: open_clip, model: ..., pretrained: ...}``"""

    model: str = Field(
        "vlprompt_tiny",
        description="open_clip model name (see open_clip.list_models()), or a path to a "
        "model config JSON; ignored for OpenAI-format checkpoints, whose architecture is read from the weights",
    )
    pretrained: str | None = Field(
        "embedded",
        description="a pretrained tag (e.g. 'openai', 'laion2b_s34b_b79k'), a checkpoint file path, "
        "'embedded' for the shipped tiny CLIP, or null for random weights",
    )
    format: Literal["auto", "open_clip", "openai"] = Field(
        "auto",
        description="checkpoint file format; 'auto' treats TorchScript archives as OpenAI CLIP",
    )
    quick_gelu: bool | None = Field(
        None,
        description="force QuickGELU; by default it follows the pretrained tag "
        "(OpenAI weights need it; a mismatch silently hurts accuracy)",
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _model_config(opts: OpenClipOptions) -> Path | None:
    """The config file a model name refers to (the embedded model, or a JSON path)."""
    if opts.model == EMBEDDED_MODEL:
        return Path(EMBEDDED_CONFIG)
    if opts.model.endswith(".json"):
        return Path(opts.model).expanduser()
    return None


def _checkpoint_path(opts: OpenClipOptions) -> Path | None:
    """``pretrained`` as a file path, when it names one (or looks like one)."""
    p = opts.pretrained
    if p is None or p == "embedded":
        return None
    path = Path(p).expanduser()
    return path if (path.suffix or "/" in p or path.is_file()) else None


def check_open_clip(opts: OpenClipOptions) -> list[str]:
    """What is wrong with ``opts`` that can be told without loading weights: one line each."""
    import open_clip

    problems = []
    config = _model_config(opts)
    checkpoint = _checkpoint_path(opts)
    openai_file = checkpoint is not None and (
        opts.format == "openai" or (opts.format == "auto" and checkpoint.is_file() and _is_torchscript(checkpoint))
    )
    if config is not None:
        if not config.is_file():
            problems.append(f"backbone.model: model config file not found: {config}")
    elif opts.model not in open_clip.list_models() and not openai_file:
        problems.append(f"backbone.model: unknown open_clip model {opts.model!r} (see open_clip.list_models())")
    if opts.pretrained == "embedded":
        if opts.model != EMBEDDED_MODEL:
            problems.append(f"backbone.pretrained: 'embedded' weights exist only for model {EMBEDDED_MODEL!r}")
        elif not EMBEDDED_WEIGHTS.is_file():
            problems.append(f"backbone.pretrained: embedded weights missing: {EMBEDDED_WEIGHTS}")
    elif checkpoint is not None:
        if not checkpoint.is_file():
            problems.append(f"backbone.pretrained: checkpoint file not found: {checkpoint}")
    elif opts.pretrained is not None and config is None and not problems:
        if not open_clip.get_pretrained_cfg(opts.model, opts.pretrained):
            tags = ", ".join(t for m, t in open_clip.list_pretrained() if m == opts.model) or "none"
            problems.append(
                f"backbone.pretrained: no tag {opts.pretrained!r} for {opts.model!r} (tags: {tags}), and no such file"
            )
    return problems


def _create_open_clip_model(opts: OpenClipOptions) -> tuple[nn.Module, str]:
    """The model and the name its tokenizer is registered under."""
    import open_clip

    problems = check_open_clip(opts)
    if problems:
        raise UserError(*problems)
    config = _model_config(opts)
    model_name = opts.model
    if config is not None:
        open_clip.add_model_config(config)
        model_name = config.stem

    pretrained = str(EMBEDDED_WEIGHTS) if opts.pretrained == "embedded" else opts.pretrained
    path = _checkpoint_path(opts)
    quick_gelu = opts.quick_gelu
    if path is not None:
        if opts.format == "openai" or (opts.format == "auto" and _is_torchscript(path)):
            # OpenAI CLIP: architecture read from the weights, QuickGELU as trained. Every
            # OpenAI CLIP uses the same BPE tokenizer, registered under any OpenAI name.
            return open_clip.load_openai_model(str(path), precision="fp32", device="cpu"), "ViT-B-32"
        pretrained = str(path)
    elif pretrained is not None and opts.pretrained != "embedded" and quick_gelu is None:
        quick_gelu = bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
    try:
        model = open_clip.create_model(
            model_name, pretrained=pretrained, force_quick_gelu=bool(quick_gelu), device="cpu"
        )
        return model, model_name
    except (RuntimeError, AssertionError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if path is not None or opts.pretrained == "embedded":
            raise UserError(
                f"backbone.pretrained: {path or pretrained} does not fit model {model_name!r} ({first}); "
                "for an original OpenAI CLIP file set format: openai"
            ) from None
        if isinstance(exc, RuntimeError) and ("download" in first.lower() or "offline" in first.lower()):
            raise UserError(f"backbone.pretrained: could not fetch weights {pretrained!r}: {first}") from None
        raise


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
        self.capabilities = frozenset({"vision_transformer"} if vit else ())
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

    def encode_text_embeddings(self, embeddings, tokens, block_hook=None, add_positional=True):
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
        x = _run_blocks(text.transformer, x, mask, block_hook, "text", keep_length=True)
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

    def encode_text_prefix(self, prefix: torch.Tensor) -> TextPrefix:
        """Each block runs on the prefixes as in the full pass (causal mask over P tokens);
        its keys and values are projected once per prefix, for all the suffixes."""
        transformer = self.text.transformer
        x = prefix.to(self._text_cast(prefix))
        mask = self.text.attn_mask[: x.shape[1], : x.shape[1]]
        batch_first = getattr(transformer, "batch_first", True)
        states = []
        for block in transformer.resblocks:
            states.append(_keys_values(block, x))
            x = block(x, attn_mask=mask) if batch_first else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
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
        for block, (keys, values) in zip(self.text.transformer.resblocks, prefix):
            x = _suffix_block(block, x, keys, values, mask)
        pooled = x[:, torch.arange(x.shape[1], device=x.device), pool]  # [G, C, W]
        return self._text_output(pooled)

    def _text_cast(self, x):
        transformer = self.text.transformer
        return transformer.get_cast_dtype() if hasattr(transformer, "get_cast_dtype") else x.dtype

    # ---------------------------------------------------------------- vision
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
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

    def encode_image_tokens(self, tokens, block_hook=None):
        v = self._vit()
        x = _run_blocks(v.transformer, tokens, None, block_hook, "image", keep_length=False)
        return self.image_head(x)

    def image_head(self, tokens):
        v = self._vit()
        pooled = v.ln_post(tokens[:, 0])  # a per-token norm: the same before or after pooling
        return pooled @ v.proj if v.proj is not None else pooled


def _run_blocks(transformer, x, mask, block_hook, tower: str, keep_length: bool):
    """The blocks of one tower, with ``block_hook`` before each, checked against its contract."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        if block_hook is not None:
            before = x.shape
            x = block_hook(i, x)
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                raise ContractError(f"{tower} block_hook before block {i} must return a [N, L, W] tensor")
            if keep_length and x.shape != before:
                raise ContractError(
                    f"{tower} block_hook before block {i} changed the tokens from {list(before)} to {list(x.shape)}; "
                    "text prompts must replace token states, not insert or remove tokens (pooling reads the "
                    "positions from the token ids)"
                )
            if x.shape[0] != before[0] or x.shape[2] != before[2]:
                raise ContractError(
                    f"{tower} block_hook before block {i} changed the batch size or width from {list(before)} "
                    f"to {list(x.shape)}; only the number of tokens may change"
                )
        if not batch_first:
            x = x.transpose(0, 1)
        x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
    return x


def _shares_prefixes(text, pool_type: str) -> bool:
    """Whether a text tower allows :meth:`OpenClipBackbone.encode_text_prefix`: a causal
    mask, pooling at a token (``argmax``/``eos``: the end token, after any shared
    prefix), and blocks that are open_clip's plain ``ResidualAttentionBlock`` (self-
    attention through ``nn.MultiheadAttention``'s packed projection, which
    :func:`_suffix_block` redoes by hand)."""
    from open_clip.transformer import ResidualAttentionBlock

    mask = text.attn_mask
    if mask is None or pool_type not in ("argmax", "eos"):
        return False
    causal = torch.full(mask.shape, float("-inf")).triu(1)
    if not torch.equal(mask.detach().float().cpu(), causal):
        return False
    for block in text.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            return False
        attn = block.attn
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            return False
    return True


def _keys_values(block, x):
    """The keys and values ``[G, heads, P, head_dim]`` of ``block``'s attention over ``x`` ``[G, P, W]``."""
    attn = block.attn
    width, heads = x.shape[-1], attn.num_heads
    bias = attn.in_proj_bias[width:] if attn.in_proj_bias is not None else None
    kv = F.linear(block.ln_1(x), attn.in_proj_weight[width:], bias)  # [G, P, 2W]
    keys, values = kv.unflatten(-1, (2, heads, width // heads)).permute(2, 0, 3, 1, 4)
    return keys, values


def _suffix_block(block, x, keys, values, mask):
    """One ``ResidualAttentionBlock`` on suffix tokens ``x`` ``[G, C, S, W]`` whose prompts
    begin with the prefix of ``keys``/``values`` ``[G, H, P, d]``; ``mask`` ``[S, P + S]`` is
    the additive causal mask of the suffix rows.

    Scores against the prefix are one matmul per (group, head) with the classes folded
    into the query rows, so the prefix keys and values are read, not copied, per class;
    one softmax covers prefix and suffix columns, as the full pass's attention does.
    """
    attn = block.attn
    groups, n_cls, length, width = x.shape
    heads = attn.num_heads
    n_prefix, head_dim = keys.shape[2], width // heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # [G, C, S, 3W]
    q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).permute(3, 0, 4, 1, 2, 5)  # each [G, H, C, S, d]
    q = q * head_dim**-0.5
    to_prefix = q.reshape(groups, heads, n_cls * length, head_dim) @ keys.transpose(-1, -2)
    scores = torch.cat([to_prefix.view(groups, heads, n_cls, length, n_prefix), q @ k.transpose(-1, -2)], dim=-1)
    probs = torch.softmax(scores + mask.to(scores.dtype), dim=-1)  # [G, H, C, S, P + S]
    from_prefix = probs[..., :n_prefix].reshape(groups, heads, n_cls * length, n_prefix) @ values
    out = from_prefix.view(groups, heads, n_cls, length, head_dim) + probs[..., n_prefix:] @ v
    out = out.permute(0, 2, 3, 1, 4).reshape(groups, n_cls, length, width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def build_open_clip(opts: OpenClipOptions) -> OpenClipBackbone:
    import open_clip

    model, tokenizer_name = _create_open_clip_model(opts)
    return OpenClipBackbone(model, open_clip.get_tokenizer(tokenizer_name), name=Path(opts.model).stem)


@hookimpl
def vlprompt_backbones():
    return [
        BackboneEntry(
            name="open_clip",
            options=OpenClipOptions,
            build=build_open_clip,
            description="any open_clip model: pretrained tag, checkpoint file, or the embedded tiny CLIP",
            check=check_open_clip,
        )
    ]
