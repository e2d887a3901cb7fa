"""Hand-written prompt templates and the frozen class features made with them.

* :data:`ENSEMBLE_TEMPLATES`, :data:`TemplateChoice`, :func:`templates_for` and
  :func:`check_templates` — which hand-written templates an option stands for.
* :func:`class_text_features` — frozen hand-crafted class features (one template
  or an ensemble), as zero-shot CLIP and methods' priors use them.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F

from ..api import ClassSet, VisionLanguageBackbone

#: The 7 templates the reference ``ZeroshotCLIP2`` averages (with the dataset's own).
ENSEMBLE_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

#: ``"dataset"`` (the dataset's first template), ``"ensemble"`` (the dataset's prompt
#: ensemble, see :func:`templates_for`), or a list of templates with ``{}``.
TemplateChoice = Union[Literal["dataset", "ensemble"], list[str]]


def templates_for(choice: TemplateChoice, classes: ClassSet) -> list[str]:
    """The hand-written templates ``choice`` stands for on ``classes``.

    ``"ensemble"`` is ``classes.ensemble`` when the dataset names one (its spec
    file's ``ensemble:``, e.g. the reference ``ZeroshotCLIP2``'s 7 templates alone for
    ImageNet, the 7 plus the dataset's own template elsewhere), else the dataset's
    templates followed by :data:`ENSEMBLE_TEMPLATES`.
    """
    if choice == "dataset":
        return classes.templates[:1]
    if choice == "ensemble":
        if classes.ensemble:
            return list(dict.fromkeys(classes.ensemble))
        return list(dict.fromkeys(classes.templates + ENSEMBLE_TEMPLATES))
    return list(choice)


def check_templates(value):
    """A validator for :data:`TemplateChoice` option fields: every template needs ``{}``."""
    if isinstance(value, list):
        bad = [t for t in value if "{}" not in t]
        if bad or not value:
            raise ValueError(f"each template needs a '{{}}' for the class name: {bad or 'empty list'}")
    return value


@torch.no_grad()
def class_text_features(backbone: VisionLanguageBackbone, names: list[str], templates: list[str]) -> torch.Tensor:
    """Frozen class features: the mean over templates of normalised text features,
    re-normalised: ``[C, embed_dim]`` (fp32)."""
    device = backbone.positional_embedding.device
    feats = []
    for template in templates:
        tokens = backbone.tokenize([template.format(n) for n in names]).to(device)
        feats.append(F.normalize(backbone.encode_text(tokens).float(), dim=-1))
    return F.normalize(torch.stack(feats).mean(0), dim=-1)
