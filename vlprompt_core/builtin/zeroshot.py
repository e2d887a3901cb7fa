"""Zero-shot CLIP: hand-written prompts, nothing learned (the baseline)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from vlprompt_kernels import cosine_logits

from .. import hookimpl
from ..api import ClassSet, MethodOutput, MethodPlugin, Options, PromptMethod

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


class ZeroShotOptions(Options):
    templates: Literal["dataset", "ensemble"] | list[str] = Field(
        "dataset",
        description="'dataset': the dataset's first template; 'ensemble': the dataset's templates plus "
        "the 7 reference ensemble templates, features averaged; or a list of templates with '{}'",
    )

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, value):
        if isinstance(value, list):
            bad = [t for t in value if "{}" not in t]
            if bad or not value:
                raise ValueError(f"each template needs a '{{}}' for the class name: {bad or 'empty list'}")
        return value


@torch.no_grad()
def class_text_features(backbone, names: list[str], templates: list[str]) -> torch.Tensor:
    """Mean over templates of normalised text features, re-normalised: ``[C, D]``."""
    device = next(backbone.parameters()).device
    feats = []
    for template in templates:
        tokens = backbone.tokenize([template.format(n) for n in names]).to(device)
        feats.append(F.normalize(backbone.encode_text(tokens).float(), dim=-1))
    return F.normalize(torch.stack(feats).mean(0), dim=-1)


class ZeroShotCLIP(PromptMethod):
    modality = "text"

    def __init__(self, backbone, classes: ClassSet, options: ZeroShotOptions):
        super().__init__(backbone, classes, options)
        self.set_classes(classes)

    def templates_for(self, classes: ClassSet) -> list[str]:
        choice = self.options.templates
        if choice == "dataset":
            return classes.templates[:1]
        if choice == "ensemble":
            return list(dict.fromkeys(classes.templates + ENSEMBLE_TEMPLATES))
        return list(choice)

    def set_classes(self, classes: ClassSet) -> None:
        self.text_features = class_text_features(self.backbone, classes.names, self.templates_for(classes))

    def forward(self, images=None, image_features=None) -> MethodOutput:
        if image_features is None:
            image_features = self.backbone.encode_image(images)
        logits = cosine_logits(image_features.float(), self.text_features.to(image_features.device), self.backbone.logit_scale)
        return MethodOutput(logits)


@hookimpl
def vlprompt_methods() -> list[MethodPlugin]:
    return [MethodPlugin("zeroshot", ZeroShotOptions, ZeroShotCLIP, "zero-shot CLIP with hand-written prompts")]
