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
from pydantic import Field
from torch import nn

from .. import hookimpl
from ..api import BackbonePlugin, Options, VisionLanguageBackbone
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


def _create_open_clip_model(opts: OpenClipOptions) -> tuple[nn.Module, str]:
    """The model and the name its tokenizer is registered under."""
    import open_clip

    model_name = opts.model
    if model_name == EMBEDDED_MODEL or model_name.endswith(".json"):
        cfg = EMBEDDED_CONFIG if model_name == EMBEDDED_MODEL else Path(model_name).expanduser()
        if not Path(cfg).is_file():
            raise UserError(f"backbone.model: model config file not found: {cfg}")
        open_clip.add_model_config(cfg)
        model_name = Path(cfg).stem
    elif model_name not in open_clip.list_models():
        raise UserError(f"backbone.model: unknown open_clip model {model_name!r} (see open_clip.list_models())")

    pretrained = opts.pretrained
    if pretrained == "embedded":
        if model_name != EMBEDDED_MODEL:
            raise UserError(f"backbone.pretrained: 'embedded' weights exist only for model {EMBEDDED_MODEL!r}")
        pretrained = str(EMBEDDED_WEIGHTS)
        if not EMBEDDED_WEIGHTS.is_file():
            raise UserError(f"backbone.pretrained: embedded weights missing: {EMBEDDED_WEIGHTS}")

    quick_gelu = opts.quick_gelu
    path = Path(pretrained).expanduser() if pretrained else None
    if path is not None and (path.suffix or "/" in pretrained) and not path.is_file():
        raise UserError(f"backbone.pretrained: checkpoint file not found: {path}")
    if path is not None and path.is_file():
        if opts.format == "openai" or (opts.format == "auto" and _is_torchscript(path)):
            # OpenAI CLIP: architecture read from the weights, QuickGELU as trained.
            return open_clip.load_openai_model(str(path), precision="fp32", device="cpu"), "ViT-B-32"
        pretrained = str(path)
    elif pretrained is not None and quick_gelu is None:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag_cfg:
            tags = ", ".join(t for m, t in open_clip.list_pretrained() if m == model_name) or "none"
            raise UserError(
                f"backbone.pretrained: no tag {pretrained!r} for {model_name!r} (tags: {tags}), and no such file"
            )
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        model = open_clip.create_model(
            model_name, pretrained=pretrained, force_quick_gelu=bool(quick_gelu), device="cpu"
        )
        return model, model_name
    except (RuntimeError, AssertionError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if path is not None and path.is_file():
            raise UserError(
                f"backbone.pretrained: {path} does not fit model {model_name!r} ({first}); "
                "for an original OpenAI CLIP file set format: openai"
            ) from None
        if isinstance(exc, RuntimeError) and ("download" in first.lower() or "offline" in first.lower()):
            raise UserError(f"backbone.pretrained: could not fetch weights {pretrained!r}: {first}") from None
        raise


class OpenClipBackbone(VisionLanguageBackbone):
    """A frozen open_clip ``CLIP`` (or ``CustomTextCLIP`` with open_clip's text tower)."""

    def __init__(self, model: nn.Module, tokenizer: Callable):
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
        """Index of the token whose state is the text feature, per sequence."""
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
        """Run the text tower from token embeddings ``[N, L, D]``.

        The tower is causal, so the state at the pooled token depends only on the
        tokens up to it: sequences are cut to the longest pooled position, with the
        same result as the full context. ``block_hook(l, x)`` may replace tokens
        before block ``l`` (it must keep the sequence length).
        """
        text = self.text
        cast = text.transformer.get_cast_dtype() if hasattr(text.transformer, "get_cast_dtype") else embeddings.dtype
        pos = self.pool_positions(tokens)
        x = embeddings.to(cast)
        mask = text.attn_mask
        if mask is not None and self.pool_type in ("argmax", "eos"):
            length = int(pos.max()) + 1
            x = x[:, :length]
            mask = mask[:length, :length]
        length = x.shape[1]
        if add_positional:
            x = x + text.positional_embedding[:length].to(cast)
        x = self._run_blocks(text.transformer, x, mask, block_hook)
        x = text.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pos]
        proj = text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    @staticmethod
    def _run_blocks(transformer, x, mask, block_hook):
        batch_first = getattr(transformer, "batch_first", True)
        for i, block in enumerate(transformer.resblocks):
            if block_hook is not None:
                x = block_hook(i, x)
            if not batch_first:
                x = x.transpose(0, 1)
            x = block(x, attn_mask=mask)
            if not batch_first:
                x = x.transpose(0, 1)
        return x

    # ---------------------------------------------------------------- vision
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def _require_vit(self):
        if not hasattr(self.visual, "_embeds") or not hasattr(self.visual, "transformer"):
            raise UserError(
                f"backbone: the vision tower {type(self.visual).__name__} has no ViT blocks for visual prompts"
            )

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class + positional embeddings after ``ln_pre``: ``[B, 1 + P, W]``."""
        self._require_vit()
        return self.visual._embeds(images)

    def encode_image_tokens(self, tokens, block_hook=None):
        """Run the ViT blocks on ``tokens`` (from :meth:`embed_image`), pool and project."""
        self._require_vit()
        x = self._run_blocks(self.visual.transformer, tokens, None, block_hook)
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


def build_open_clip(opts: OpenClipOptions) -> OpenClipBackbone:
    import open_clip

    model, tokenizer_name = _create_open_clip_model(opts)
    return OpenClipBackbone(model, open_clip.get_tokenizer(tokenizer_name))


@hookimpl
def vlprompt_backbones():
    return [
        BackbonePlugin(
            name="open_clip",
            options=OpenClipOptions,
            build=build_open_clip,
            description="any open_clip model: pretrained tag, checkpoint file, or the embedded tiny CLIP",
        )
    ]
