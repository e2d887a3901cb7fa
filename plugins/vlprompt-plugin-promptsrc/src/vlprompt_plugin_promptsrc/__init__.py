"""PromptSRC: "Self-regulating Prompts: Foundational Model Adaptation without
Forgetting" (Khattak et al., ICCV 2023).

IVLP prompts (independent deep prompts in the text and the image tower) trained with
cross-entropy plus three self-regulating terms that keep the prompted model close to the
frozen one: an L1 pull of the prompted class text features towards the frozen features
averaged over 60 hand-written templates, an L1 pull of the prompted image feature towards
the frozen image feature of the same image, and a KL divergence to the frozen zero-shot
scores. The prompts kept at the end are a Gaussian-weighted average of the prompts after
each epoch (GPA, :mod:`.gpa`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import (
    BackboneInfo,
    Batch,
    ClassSet,
    EffectiveOptions,
    MethodEntry,
    MethodOutput,
    Options,
    PromptMethod,
    Published,
)
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import (
    PromptTable,
    PromptTemplate,
    append_prompts,
    deep_prompts,
    handwritten_length_problem,
    init_context,
    leading_words,
    leading_words_problem,
    prompt_depth,
    rows_per_pass,
    text_prompt_hook,
    vision_prompt_hook,
)
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits

from .gpa import GaussianAggregate, gpa_weights
from .templates import TEACHER_TEMPLATES

__all__ = ["PromptSRC", "PromptSRCOptions", "RECIPE", "TEACHER_TEMPLATES", "gpa_weights"]


class PromptSRCOptions(Options):
    """``method: {name: promptsrc, ...}`` (defaults: the official base-to-novel config)."""

    n_ctx_text: int = Field(4, ge=1, description="text prompt tokens per layer")
    n_ctx_vision: int = Field(4, ge=1, description="image prompt tokens per layer")
    ctx_init: str = Field("a photo of a", description="the text prompt: its first n_ctx_text tokens are learned "
                          "(initialised from their embeddings), the rest stay words; '' for random context")
    prompt_depth_text: int = Field(9, ge=1, description="text layers with prompts (block 0 included); at most "
                                   "the text tower's depth is used")
    prompt_depth_vision: int = Field(9, ge=0, description="image layers with prompts (block 0 included; 0: none); "
                                     "at most the image tower's depth is used")
    text_loss_weight: float = Field(25.0, ge=0, description="weight of the L1 pull of the class text features")
    image_loss_weight: float = Field(10.0, ge=0, description="weight of the L1 pull of the image feature")
    gpa_mean: float = Field(15.0, description="GPA: epoch (1-based) of the Gaussian's peak")
    gpa_std: float = Field(1.0, gt=0, description="GPA: standard deviation of the Gaussian, in epochs")
    init_std: float = Field(0.02, gt=0, description="std of the random N(0, std^2) prompt initialisation")


class PromptSRC(PromptMethod):
    inputs = ("images", "image_features")  # prompted images, and the frozen feature of the same images
    requires = ("vision_transformer",)

    @classmethod
    def effective_options(cls, options: PromptSRCOptions, backbone: BackboneInfo) -> EffectiveOptions:
        """Prompt depths clamped to the towers; ``ctx_init`` checked against ``n_ctx_text``."""
        if options.ctx_init and backbone.word_tokens is not None:
            problem = leading_words_problem(backbone.word_tokens, options.ctx_init, options.n_ctx_text)
            if problem:
                raise UserError(f"method.ctx_init: {problem.replace('n_ctx ', 'n_ctx_text ')}")
        update, notes = {}, []
        for field, tower, depth in (("prompt_depth_text", "text", backbone.text_depth),
                                    ("prompt_depth_vision", "image", backbone.vision_depth)):
            asked = getattr(options, field)
            if depth is not None and asked > depth:
                update[field] = depth
                notes.append(f"{field} {asked} -> {depth}: the {tower} tower has {depth} blocks")
        return EffectiveOptions(options.model_copy(update=update) if update else options, tuple(notes))

    def __init__(self, backbone, classes: ClassSet, options: PromptSRCOptions):
        super().__init__(backbone, classes, options)
        o = options
        device = backbone.positional_embedding.device
        if o.ctx_init:
            self.template, ctx = leading_words(backbone, o.ctx_init, o.n_ctx_text)
        else:
            self.template = PromptTemplate.with_context(o.n_ctx_text)
            ctx = init_context(backbone, o.n_ctx_text, std=o.init_std)
        #: text prompts: ``ctx`` at the input, ``text_deep[l - 1]`` before text block l
        self.ctx = nn.Parameter(ctx)
        self.text_deep = deep_prompts(prompt_depth(o.prompt_depth_text, backbone.text_depth) - 1, o.n_ctx_text,
                                      backbone.text_width, o.init_std, device)
        #: image prompts: ``vision_ctx`` after the patch tokens (before the pre-norm),
        #: ``vision_deep[l - 1]`` in their place before image block l
        vision_depth = prompt_depth(o.prompt_depth_vision, backbone.vision_depth)
        self.vision_ctx = nn.Parameter(
            torch.empty(o.n_ctx_vision, backbone.vision_width, device=device).normal_(0, o.init_std)
        ) if vision_depth >= 1 else None
        self.vision_deep = deep_prompts(vision_depth - 1, o.n_ctx_vision, backbone.vision_width, o.init_std, device)
        self.gpa = GaussianAggregate({n: p for n, p in self.named_parameters() if p.requires_grad},
                                     o.gpa_mean, o.gpa_std)
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.names = list(classes.names)
        self.prompts = PromptTable(self.backbone, self.names, self.template)
        self._teacher = None  # the frozen text targets of these classes, computed when training needs them

    # ------------------------------------------------------------ features
    def text_features(self) -> torch.Tensor:
        """``[C, D]`` prompted class text features (not normalised)."""
        hook = text_prompt_hook(self.text_deep) if len(self.text_deep) else None
        return self.prompts.encode(self.backbone, self.ctx, block_hook=hook)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` prompted image features (not normalised)."""
        bb = self.backbone
        x = bb.embed_image(images, pre_norm=False)  # class + patches with positions
        if self.vision_ctx is not None:
            x = append_prompts(x, self.vision_ctx)  # normalised with them by the pre-norm
        hook = vision_prompt_hook(self.vision_deep) if len(self.vision_deep) else None
        return bb.encode_image_tokens(bb.vision_pre_norm(x), block_hook=hook)

    @torch.no_grad()
    def teacher_text_features(self) -> torch.Tensor:
        """``[C, D]`` frozen targets, normalised: the mean over :data:`TEACHER_TEMPLATES`
        of the frozen text features (each *not* normalised, as the official code averages
        them), in fp32. A class whose prompt in a template is longer than the text context
        is a :class:`UserError` naming it."""
        if self._teacher is None:
            bb = self.backbone
            problem = handwritten_length_problem(self.names, list(TEACHER_TEMPLATES),
                                                 lambda text: len(bb.tokenize_words(text)) + 2, bb.context_length)
            if problem:
                raise UserError(f"method promptsrc, its frozen text targets: {problem}")
            device = bb.positional_embedding.device
            rows = rows_per_pass(bb, bb.context_length, grad=False) or len(self.names)
            total = 0.0
            with torch.autocast(device.type, enabled=False):
                for template in TEACHER_TEMPLATES:
                    tokens = bb.tokenize([template.format(n) for n in self.names]).to(device)
                    feats = torch.cat([bb.encode_text(tokens[i: i + rows]).float()
                                       for i in range(0, len(tokens), rows)])
                    total = total + feats
            self._teacher = F.normalize(total / len(TEACHER_TEMPLATES), dim=-1)
        return self._teacher

    # ------------------------------------------------------------ forward
    def forward(self, batch: Batch) -> MethodOutput:
        scale = self.backbone.logit_scale
        text = F.normalize(self.cached("text_features", self.text_features).float(), dim=-1)
        image = F.normalize(self.image_features(batch.images).float(), dim=-1)
        logits = cosine_logits(image, text, scale)
        if not self.training:
            return MethodOutput(logits)
        teacher = self.teacher_text_features()  # normalised
        frozen = F.normalize(batch.image_features.float(), dim=-1)
        zero_shot = cosine_logits(frozen, teacher, scale)
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zero_shot, dim=1), reduction="sum",
                      log_target=True) / logits.numel()
        losses = {
            "text_l1": F.l1_loss(text, teacher) * self.options.text_loss_weight,
            "image_l1": F.l1_loss(image, frozen) * self.options.image_loss_weight,
            "kl": kl,
        }
        return MethodOutput(logits, losses)

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """GPA: add this epoch's prompts to the weighted sum; after the last epoch the
        prompts become the sum (what the final checkpoint and the scores use)."""
        self.gpa.add(epoch, epochs)
        if epoch == epochs - 1:
            self.gpa.load_into_parameters()


#: The official configs (muzairkhattak/PromptSRC ``configs/trainers/PromptSRC/*.yaml``, read
#: by ``scripts/promptsrc/*.sh``). Every setting: SGD lr 0.0025, batch 4, cosine after one
#: constant warm-up epoch at 1e-5, 4 + 4 prompt tokens from "a photo of a", loss weights 25
#: and 10. Base-to-novel (``vit_b16_c2_ep20_batch4_4+4ctx``): 20 epochs, depth 9 + 9, GPA
#: N(15, 1). Cross-dataset and domain generalisation (``..._cross_datasets``): 20 epochs,
#: depth 3 + 3, GPA N(6, 10). Few-shot (``vit_b16_c2_ep50_batch4_4+4ctx_few_shot``): 50 epochs,
#: depth 9 + 9, GPA N(30, 30) for ImageNet, Caltech101, OxfordPets, Food101, UCF101 and
#: SUN397 (the file's active block, also kept for datasets it does not name), N(45, 5) for
#: StanfordCars, Flowers102, FGVCAircraft, DTD and EuroSAT (its commented block). Momentum 0.9 and weight
#: decay 5e-4 are Dassl's defaults, which the configs keep.
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.0025, "batch_size": 4, "epochs": 20, "momentum": 0.9, "weight_decay": 5e-4,
           "schedule": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5},
    options={"n_ctx_text": 4, "n_ctx_vision": 4, "ctx_init": "a photo of a", "prompt_depth_text": 9,
             "prompt_depth_vision": 9, "text_loss_weight": 25.0, "image_loss_weight": 10.0,
             "gpa_mean": 15.0, "gpa_std": 1.0},
    rules=[
        RecipeRule(when={"protocol": ["cross_dataset", "domain_generalisation"]},
                   options={"prompt_depth_text": 3, "prompt_depth_vision": 3, "gpa_mean": 6.0, "gpa_std": 10.0},
                   note="configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml"),
        RecipeRule(when={"protocol": "few_shot"}, train={"epochs": 50}, options={"gpa_mean": 30.0, "gpa_std": 30.0},
                   note="configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml, its active block "
                   "(ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397)"),
        RecipeRule(when={"protocol": "few_shot",
                         "dataset": ["stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat"]},
                   options={"gpa_mean": 45.0, "gpa_std": 5.0},
                   note="the same file, its commented block (StanfordCars, Flowers102, FGVCAircraft, DTD, EuroSAT)"),
    ],
    source="muzairkhattak/PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml (base2novel), "
    "vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml (cross_dataset, domain_generalisation), "
    "vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml (few_shot; GPA per dataset from its two commented blocks), "
    "scripts/promptsrc/{base2new_train,few_shot,reproduce_xd}.sh; momentum and weight decay: Dassl defaults",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("promptsrc", PromptSRCOptions, PromptSRC,
                        "PromptSRC: IVLP deep prompts, self-regulating losses, Gaussian prompt aggregation", RECIPE,
                        published=Published.load(__name__))]
