"""Zero-shot CLIP: hand-written prompts, nothing learned (the baseline)."""

from __future__ import annotations

from pydantic import Field, field_validator

from vlprompt_kernels import cosine_logits

from .. import hookimpl
from ..api import Batch, ClassSet, MethodEntry, MethodOutput, Options, PromptMethod
from ..prompting import TemplateChoice, check_templates, class_text_features, templates_for


class ZeroShotOptions(Options):
    templates: TemplateChoice = Field(
        "dataset",
        description="'dataset': the dataset's first template; 'ensemble': the dataset's prompt ensemble as "
        "the literature uses it (its spec file's 'ensemble'; otherwise its templates plus the 7 reference "
        "ensemble templates), features averaged; or a list of templates with '{}'",
    )

    _has_slot = field_validator("templates")(check_templates)


class ZeroShotCLIP(PromptMethod):
    inputs = ("image_features",)

    def __init__(self, backbone, classes: ClassSet, options: ZeroShotOptions):
        super().__init__(backbone, classes, options)
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.text_features = class_text_features(
            self.backbone, classes.names, templates_for(self.options.templates, classes)
        )

    def forward(self, batch: Batch) -> MethodOutput:
        feats = batch.image_features
        return MethodOutput(cosine_logits(feats.float(), self.text_features.to(feats.device), self.backbone.logit_scale))


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("zeroshot", ZeroShotOptions, ZeroShotCLIP, "zero-shot CLIP with hand-written prompts",
                        trains=False)]
