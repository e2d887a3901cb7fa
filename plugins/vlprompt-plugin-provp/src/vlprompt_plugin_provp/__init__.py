"""ProVP-Ref: "Progressive Visual Prompt Learning with Contrastive Feature
Re-formation" (Xu et al., arXiv 2304.08386, IJCV 2024).

N learned prompt tokens per image-tower block. At block 0 they are inserted right
after the class token, after the pre-norm; before each later block the prompt
slots become ``alpha * (the previous block's output there) + (1 - alpha) * P_l``.
The class token's output is the image feature; the classifier is the frozen CLIP
text feature of a hand-written template. Training adds the re-formation loss, an
InfoNCE over the batch between each prompted image feature and the frozen CLIP
feature of the same augmented image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import Batch, ClassSet, EffectiveOptions, MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.prompting import TemplateChoice, check_templates, class_text_features, templates_for
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits


class ProVPOptions(Options):
    """``method: {name: provp, ...}`` (defaults: the base-to-novel setting)."""

    n_prompts: int = Field(16, ge=0, description="prompt tokens per block, N (the recipe: 16 base-to-novel, 50 few-shot)")
    alpha: float = Field(0.01, ge=0, le=1, description="weight of the previous block's output in the prompt slots")
    prompt_depth: int | None = Field(
        None, ge=1, description="blocks with prompts, from the first (default: every block of the image tower)")
    ref_weight: float = Field(1.0, ge=0, description="weight lambda of the re-formation loss (0: plain ProVP)")
    ref_temperature: float = Field(1.0, gt=0, description="temperature of the re-formation InfoNCE (official: none, i.e. 1)")
    templates: TemplateChoice = Field(
        "dataset", description="the frozen classifier's template(s): 'dataset', 'ensemble' or a list with '{}' "
        "(the recipe sets ProVP's own per-dataset templates)")
    init_patch_size: int = Field(
        14, ge=1, description="patch size in the uniform init bound sqrt(6 / (3 p^2 + width)) (official: 14)")

    _has_slot = field_validator("templates")(check_templates)


class ProVP(PromptMethod):
    inputs = ("images", "image_features")  # prompted images, and the frozen feature of the same images
    requires = ("vision_transformer",)

    @classmethod
    def effective_options(cls, options, backbone):
        """``prompt_depth`` as used: every block by default, at most the image tower's depth."""
        depth = backbone.vision_depth
        if not depth:
            return EffectiveOptions(options)
        used = min(options.prompt_depth or depth, depth)
        if used == options.prompt_depth:
            return EffectiveOptions(options)
        why = (f"prompt_depth {options.prompt_depth} -> {used}: the image tower has {depth} blocks"
               if options.prompt_depth else f"prompt_depth {used}: every block of the image tower")
        return EffectiveOptions(options.model_copy(update={"prompt_depth": used}), (why,))

    def __init__(self, backbone, classes: ClassSet, options: ProVPOptions):
        super().__init__(backbone, classes, options)
        backbone.require("vision_transformer", "method 'provp'")
        depth = min(options.prompt_depth or backbone.vision_depth, backbone.vision_depth)
        width = backbone.vision_width
        bound = math.sqrt(6.0 / (3 * options.init_patch_size**2 + width))
        device = backbone.positional_embedding.device
        self.prompts = nn.Parameter(torch.empty(depth, options.n_prompts, width, device=device).uniform_(-bound, bound))
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.text_features = class_text_features(
            self.backbone, classes.names, templates_for(self.options.templates, classes))

    def block_hook(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Before block ``block`` (>= 1): the prompt slots become ``alpha * x + (1 - alpha) * P_block``."""
        n = self.prompts.shape[1]
        if block == 0 or block >= self.prompts.shape[0] or n == 0:
            return x
        a = self.options.alpha
        mixed = a * x[:, 1 : 1 + n] + (1 - a) * self.prompts[block].to(x.dtype)
        return torch.cat([x[:, :1], mixed, x[:, 1 + n :]], dim=1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The prompted image feature ``[B, D]`` (not normalised)."""
        bb = self.backbone
        x = bb.embed_image(images)  # class + patches with positions, after the pre-norm
        p0 = self.prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], p0, x[:, 1:]], dim=1)  # inserted right after the class token
        return bb.encode_image_tokens(x, block_hook=self.block_hook)

    def forward(self, batch: Batch) -> MethodOutput:
        p = F.normalize(self.image_features(batch.images).float(), dim=-1)
        logits = cosine_logits(p, self.text_features.to(p.device), self.backbone.logit_scale)
        losses = {}
        if self.training and self.options.ref_weight > 0:
            # InfoNCE over the batch: image i's positive is the frozen feature of image i
            c = F.normalize(batch.image_features.float(), dim=-1)
            sim = cosine_logits(p, c, 1.0 / self.options.ref_temperature)  # [B, B]
            target = torch.arange(len(p), device=p.device)
            losses["reformation"] = self.options.ref_weight * F.cross_entropy(sim, target)
        return MethodOutput(logits, losses=losses)


#: MCG-NJU/ProVP ``ProVP/trainers/provp.py`` CUSTOM_TEMPLATES where they differ from the
#: datasets' own (CoOp's) templates.
TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "food101": "a type of food, a photo of {}.",
}

#: The official configs (``ProVP/configs/trainers/ProVP/*.yaml``, ``scripts/provp.sh``,
#: ``scripts/base2new_*_provp.sh``, README): SGD lr 0.1, batch 32, one constant warm-up
#: epoch at 1e-5 then cosine. Base-to-novel: N = 16, 100 epochs, weight decay 1e-3
#: (``vit_b16_b2n_ep100``). Few-shot: N = 50; 1 shot ``vit_b16_ep50`` (50 epochs, no
#: re-formation), 2 and 4 shots ``vit_b16_ep100`` (100 epochs, none), 8 and 16 shots
#: ``vit_b16`` (200 epochs, with it; weight decay 5e-4). Cross-dataset and domain
#: generalisation (no official script): the 16-shot few-shot setting.
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.1, "batch_size": 32, "momentum": 0.9, "weight_decay": 5e-4,
           "epochs": 200, "warmup_epochs": 1, "warmup_lr": 1e-5},
    options={"n_prompts": 50, "ref_weight": 1.0},
    rules=[
        RecipeRule(when={"protocol": "few_shot", "shots": 1}, train={"epochs": 50}, options={"ref_weight": 0.0}),
        RecipeRule(when={"protocol": "few_shot", "shots": [2, 4]}, train={"epochs": 100},
                   options={"ref_weight": 0.0}),
        RecipeRule(when={"protocol": "base2novel"}, train={"epochs": 100, "weight_decay": 1e-3},
                   options={"n_prompts": 16}),
        *[RecipeRule(when={"dataset": name}, options={"templates": [template]}) for name, template in TEMPLATES.items()],
    ],
    source="MCG-NJU/ProVP ProVP/configs/trainers/ProVP (vit_b16, vit_b16_ep50, vit_b16_ep100, vit_b16_b2n_ep100), "
    "scripts/provp.sh, scripts/base2new_*_provp.sh, trainers/provp.py CUSTOM_TEMPLATES",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("provp", ProVPOptions, ProVP,
                        "ProVP-Ref: progressive visual prompts + contrastive feature re-formation", RECIPE)]
