"""The ``open_clip`` backbone: any open_clip model, frozen, seen through
:class:`~vlprompt_core.api.VisionLanguageBackbone`.

Weights come from a pretrained tag (the user's cache or the hub), a local
checkpoint file (open_clip format, or an original OpenAI CLIP archive / state
dict as the reference research code loads), the project's embedded tiny CLIP
(``pretrained: embedded``), or nowhere (random init, for tests).

A checkpoint file is data, never code: it is read as tensors only (safetensors, or
PyTorch's weights-only unpickler, TorchScript archives included), so a file that
holds other Python objects is refused rather than run.

Where each part lives: :mod:`.options` (what a spec sets, and the defaults),
:mod:`.checkpoints` (reading weight files without running them),
:mod:`.pretrained` (checking options, pretrained tags and the hub, making the
model), :mod:`.tokens` (how long a text is, told without weights),
:mod:`.backbone` (:class:`OpenClipBackbone`), :mod:`.blocks` (the
transformer blocks run by hand); here, :func:`build_open_clip` and the
``vlprompt_backbones`` hook that registers the backbone (this package is the
module :data:`vlprompt_core.plugins.BUILTIN_PLUGINS` names).
"""

from __future__ import annotations

from pathlib import Path

from ... import hookimpl
from ...api import BackboneEntry
from .backbone import OpenClipBackbone
from .configs import tokenizer
from .options import EMBEDDED_CONFIG, EMBEDDED_MODEL, EMBEDDED_WEIGHTS, OPENAI_MEAN, OPENAI_STD, OpenClipOptions
from .properties import open_clip_info
from .pretrained import REACH_TIMEOUT, _cached_weights, _create_open_clip_model, check_open_clip
from .tokens import open_clip_text_context

#: What this module offers (``_cached_weights`` for the tests), as before it was split.
__all__ = [
    "EMBEDDED_CONFIG", "EMBEDDED_MODEL", "EMBEDDED_WEIGHTS", "OPENAI_MEAN", "OPENAI_STD", "REACH_TIMEOUT",
    "OpenClipBackbone", "OpenClipOptions", "_cached_weights", "build_open_clip", "check_open_clip",
    "vlprompt_backbones",
]


def build_open_clip(opts: OpenClipOptions) -> OpenClipBackbone:
    model, tokenizer_name = _create_open_clip_model(opts)
    return OpenClipBackbone(model, tokenizer(tokenizer_name), name=Path(opts.model).stem)


@hookimpl
def vlprompt_backbones():
    return [
        BackboneEntry(
            name="open_clip",
            options=OpenClipOptions,
            build=build_open_clip,
            description="any open_clip model: pretrained tag, checkpoint file, or the embedded tiny CLIP",
            check=check_open_clip,
            text_context=open_clip_text_context,
            info=open_clip_info,
        )
    ]
