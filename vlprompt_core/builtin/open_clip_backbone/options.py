"""What a spec can say about the ``open_clip`` backbone (:class:`OpenClipOptions`:
model, pretrained weights, checkpoint format, QuickGELU) and the defaults behind
it: OpenAI CLIP's image normalisation, and the embedded tiny CLIP (its model name,
config and weights file) that ``pretrained: embedded`` stands for. Nothing here
loads anything; :mod:`.pretrained` turns these options into a model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...api import Options
from ...embedded import pretrain as embedded

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

