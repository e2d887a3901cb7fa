"""What an open_clip model is, told without loading its weights
(``BackboneEntry.info``): depths and widths from its model config (open_clip's own,
or a config file), or, for an OpenAI-format checkpoint, from the shapes of its
tensors, read once per file; the tokenizer counts words. Recipe rules match it and
methods settle their options on it before a run (``vlprompt validate`` included)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from ...api import BackboneInfo
from .checkpoints import _is_torchscript, _load_tensors, _torchscript_state_dict
from .configs import register_model_config
from .options import OpenClipOptions
from .pretrained import _checkpoint_path, _model_config, check_open_clip
from .tokens import open_clip_text_context


def open_clip_info(opts: OpenClipOptions) -> BackboneInfo | None:
    """The :class:`BackboneInfo` of the model ``opts`` names; None when the options are
    wrong (their check says why)."""
    import open_clip

    if check_open_clip(opts):
        return None
    checkpoint = _checkpoint_path(opts)
    if checkpoint is not None and (opts.format == "openai" or (opts.format == "auto" and _is_torchscript(checkpoint))):
        stat = checkpoint.stat()
        info = _openai_info(str(checkpoint), stat.st_size, stat.st_mtime_ns)
    else:
        name = opts.model
        config = _model_config(opts)
        if config is not None:
            name = register_model_config(config)  # as making the model does
        info = _config_info(name, open_clip.get_model_config(name) or {})
    counted = open_clip_text_context(opts)
    if counted is not None:
        count = counted[0]
        info = BackboneInfo(**{**info.__dict__, "word_tokens": lambda text: count(text) - 2})
    return info


def _config_info(name: str, config: dict) -> BackboneInfo:
    """Sizes from an open_clip model config, with open_clip's defaults for what it leaves out."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(**config.get("vision_cfg", {}))
    text = CLIPTextCfg(**config.get("text_cfg", {}))
    vit = (isinstance(vision.layers, int) and not vision.timm_model_name and not vision.attentional_pool
           and vision.pool_type == "tok")
    transformer = isinstance(vision.layers, int) and not vision.timm_model_name
    return BackboneInfo(
        family=name,
        text_depth=None if text.hf_model_name else text.layers,
        text_width=None if text.hf_model_name else text.width,
        vision_depth=vision.layers if transformer else 0,
        vision_width=vision.width if transformer else 0,
        context_length=text.context_length,
        embed_dim=config.get("embed_dim"),
        # open_clip's own transformer blocks in both towers: projection hooks (LoRA) can reach them
        capabilities=frozenset({"vision_transformer"} if vit else ())
        | frozenset({"projection_hooks"} if vit and not text.hf_model_name else ()),
    )


@functools.lru_cache(maxsize=4)
def _openai_info(path: str, size: int, mtime_ns: int) -> BackboneInfo:
    """Sizes read from the tensors of an OpenAI CLIP file (as open_clip builds it from
    them), once per file version (``size``, ``mtime_ns``)."""
    file = Path(path)
    state = _torchscript_state_dict(file) if _is_torchscript(file) else _load_tensors(file)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()} if isinstance(state, dict) else {}

    def blocks(prefix: str) -> int:
        return len({m.group(1) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})

    vit = "visual.proj" in state
    return BackboneInfo(
        family=file.stem,
        text_depth=blocks("transformer.resblocks."),
        text_width=state["ln_final.weight"].shape[0] if "ln_final.weight" in state else None,
        vision_depth=blocks("visual.transformer.resblocks.") if vit else 0,
        vision_width=state["visual.conv1.weight"].shape[0] if vit else 0,
        context_length=state["positional_embedding"].shape[0] if "positional_embedding" in state else None,
        embed_dim=state["text_projection"].shape[1] if "text_projection" in state else None,
        capabilities=frozenset({"vision_transformer", "projection_hooks"} if vit else ()),
    )
