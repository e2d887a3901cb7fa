"""MaPLe: "Multi-modal Prompt Learning" (Khattak et al., CVPR 2023), and the baselines
its official code ships: IVLP (independent deep vision and language prompts), deep VPT
(vision only) and deep language prompting (text only).

All four put learned prompts into the first J blocks of a tower
(:mod:`vlprompt_core.prompting.deep`): in the text tower, the context vectors of block 0
and, before each block 1 .. J-1, that block's own prompts at the same slots; in the
image tower, n prompt tokens appended after the patch tokens before the pre-norm and,
before each block 1 .. J-1, that block's prompts in place of the last n tokens. MaPLe
couples the towers: each vision prompt is a learned linear map of the text prompt of
the same depth. The backbone stays frozen; the loss is cross-entropy.

Four entries, one option class each: they differ in which towers are prompted, in their
defaults and recipes, and in the published numbers; one option class with switches
would let a spec say ``maple`` and run something else.
"""

from __future__ import annotations

import copy

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
    class_text_features,
    deep_prompts,
    init_context,
    leading_words,
    leading_words_problem,
    prompt_depth,
    text_prompt_hook,
    vision_prompt_hook,
)
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits

# ----------------------------------------------------------------------------- options

_CTX_INIT = Field("a photo of a", description="the learned context starts as the first n_ctx tokens of these words; "
                  "the rest stay words before the class name ('' for random context)")
_STD = Field(0.02, gt=0, description="std of the N(0, std^2) initialisation of random and deep prompts")


class MaPLeOptions(Options):
    """``method: {name: maple, ...}`` (defaults: the official base-to-novel config)."""

    n_ctx: int = Field(2, ge=1, description="prompt tokens per layer, the same in both towers")
    ctx_init: str = _CTX_INIT
    prompt_depth: int = Field(9, ge=1, description="J: layers with prompts, the first included (clamped to the "
                              "deeper tower; 1 = prompts at the input only)")
    init_std: float = _STD


class IVLPOptions(Options):
    """``method: {name: ivlp, ...}``: independent deep prompts in both towers."""

    n_ctx_text: int = Field(2, ge=1, description="text prompt tokens per layer")
    n_ctx_vision: int = Field(2, ge=1, description="image prompt tokens per layer")
    ctx_init: str = _CTX_INIT
    prompt_depth_text: int = Field(12, ge=1, description="text layers with prompts (clamped to the tower)")
    prompt_depth_vision: int = Field(12, ge=1, description="image layers with prompts (clamped to the tower)")
    init_std: float = _STD


class LanguageDeepOptions(Options):
    """``method: {name: language_deep, ...}``: deep text prompts, frozen image tower."""

    n_ctx: int = Field(4, ge=1, description="text prompt tokens per layer")
    ctx_init: str = _CTX_INIT
    prompt_depth: int = Field(12, ge=1, description="text layers with prompts (clamped to the tower)")
    init_std: float = _STD


class VPTDeepOptions(Options):
    """``method: {name: vpt_deep, ...}``: deep image prompts, a frozen hand-written classifier."""

    n_ctx: int = Field(8, ge=1, description="image prompt tokens per layer")
    prompt_depth: int = Field(12, ge=1, description="image layers with prompts (clamped to the tower)")
    template: str = Field("a photo of a {}.", description="the frozen classifier's prompt ('{}': the class name)")
    init_std: float = _STD


def _clamped(options: Options, info: BackboneInfo, fields: dict[str, int | None]) -> EffectiveOptions:
    """``options`` with each depth field clamped to its tower depth (None: unknown, kept)."""
    update, notes = {}, []
    for name, tower in fields.items():
        asked = getattr(options, name)
        if tower is not None and asked > tower:
            update[name] = tower
            notes.append(f"{name} {asked} -> {tower}: the tower has {tower} blocks")
    return EffectiveOptions(options.model_copy(update=update) if update else options, tuple(notes))


def _check_ctx_init(info: BackboneInfo, ctx_init: str, n_ctx: int, field: str) -> None:
    if ctx_init and info.word_tokens is not None:
        problem = leading_words_problem(info.word_tokens, ctx_init, n_ctx)
        if problem:
            raise UserError(f"method.{field}: {problem}")


# ----------------------------------------------------------------------------- methods


class _DeepTextPrompts(nn.Module):
    """The text side: context vectors of block 0 (the first ``n`` tokens of ``ctx_init``,
    or random) and deep prompts for blocks 1 .. depth-1, through one :class:`PromptTable`."""

    def __init__(self, backbone, n_ctx: int, ctx_init: str, depth: int, std: float):
        super().__init__()
        if ctx_init:
            self.template, ctx = leading_words(backbone, ctx_init, n_ctx)
        else:
            self.template, ctx = PromptTemplate.with_context(n_ctx), init_context(backbone, n_ctx, std=std)
        self.ctx = nn.Parameter(ctx)
        self.deep = deep_prompts(depth - 1, n_ctx, backbone.text_width, std, ctx.device)

    def set_classes(self, backbone, classes: ClassSet) -> None:
        self.prompts = PromptTable(backbone, classes.names, self.template)

    def features(self, backbone) -> torch.Tensor:
        """``[C, D]`` class text features (not normalised)."""
        return self.prompts.encode(backbone, self.ctx, block_hook=text_prompt_hook(list(self.deep)))


def _prompted_image_features(backbone, images, first: torch.Tensor, deep: list[torch.Tensor]) -> torch.Tensor:
    """Image features ``[B, D]`` with ``first`` appended before the pre-norm and ``deep``
    replacing the last tokens before blocks 1, 2, ... (the official MaPLe / IVLP / VPT)."""
    x = append_prompts(backbone.embed_image(images, pre_norm=False), first)
    return backbone.encode_image_tokens(backbone.vision_pre_norm(x), block_hook=vision_prompt_hook(deep))


def _logits(backbone, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return cosine_logits(F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1), backbone.logit_scale)


class MaPLe(PromptMethod):
    """Coupled deep prompts: vision prompts of layer j = ``Linear_j(text prompts of layer j)``."""

    inputs = ("images",)
    requires = ("vision_transformer",)

    @classmethod
    def effective_options(cls, options: MaPLeOptions, backbone: BackboneInfo) -> EffectiveOptions:
        _check_ctx_init(backbone, options.ctx_init, options.n_ctx, "n_ctx")
        depths = [d for d in (backbone.text_depth, backbone.vision_depth) if d is not None]
        return _clamped(options, backbone, {"prompt_depth": max(depths) if len(depths) == 2 else None})

    def __init__(self, backbone, classes: ClassSet, options: MaPLeOptions):
        super().__init__(backbone, classes, options)
        backbone.require("vision_transformer", "method 'maple'")
        depth = prompt_depth(options.prompt_depth, max(backbone.text_depth, backbone.vision_depth))
        self.text = _DeepTextPrompts(backbone, options.n_ctx, options.ctx_init, depth, options.init_std)
        widths, device = (backbone.text_width, backbone.vision_width), self.text.ctx.device
        self.proj = nn.Linear(*widths, device=device)
        one = nn.Linear(*widths, device=device)  # the official code clones one layer: the deep ones start equal
        self.deep_proj = nn.ModuleList(copy.deepcopy(one) for _ in range(depth - 1))
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.text.set_classes(self.backbone, classes)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        deep = [proj(p) for proj, p in zip(self.deep_proj, self.text.deep)]
        return _prompted_image_features(self.backbone, images, self.proj(self.text.ctx), deep)

    def forward(self, batch: Batch) -> MethodOutput:
        text = self.cached("text_features", lambda: self.text.features(self.backbone))
        return MethodOutput(_logits(self.backbone, self.image_features(batch.images), text))


class _DeepVisionPrompts(nn.Module):
    """The image side of IVLP and deep VPT: ``first`` ``[n, vision_width]`` at the input,
    ``deep`` for blocks 1 .. depth-1."""

    def __init__(self, backbone, n: int, depth: int, std: float):
        super().__init__()
        device = backbone.positional_embedding.device
        self.first = nn.Parameter(torch.empty(n, backbone.vision_width, device=device).normal_(0, std))
        self.deep = deep_prompts(depth - 1, n, backbone.vision_width, std, device)

    def features(self, backbone, images: torch.Tensor) -> torch.Tensor:
        return _prompted_image_features(backbone, images, self.first, list(self.deep))


class IVLP(PromptMethod):
    """Independent deep prompts in both towers."""

    inputs = ("images",)
    requires = ("vision_transformer",)

    @classmethod
    def effective_options(cls, options: IVLPOptions, backbone: BackboneInfo) -> EffectiveOptions:
        _check_ctx_init(backbone, options.ctx_init, options.n_ctx_text, "n_ctx_text")
        return _clamped(options, backbone, {"prompt_depth_text": backbone.text_depth,
                                            "prompt_depth_vision": backbone.vision_depth})

    def __init__(self, backbone, classes: ClassSet, options: IVLPOptions):
        super().__init__(backbone, classes, options)
        backbone.require("vision_transformer", "method 'ivlp'")
        text_depth = prompt_depth(options.prompt_depth_text, backbone.text_depth)
        vision_depth = prompt_depth(options.prompt_depth_vision, backbone.vision_depth)
        self.text = _DeepTextPrompts(backbone, options.n_ctx_text, options.ctx_init, text_depth, options.init_std)
        self.vision = _DeepVisionPrompts(backbone, options.n_ctx_vision, vision_depth, options.init_std)
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.text.set_classes(self.backbone, classes)

    def forward(self, batch: Batch) -> MethodOutput:
        text = self.cached("text_features", lambda: self.text.features(self.backbone))
        return MethodOutput(_logits(self.backbone, self.vision.features(self.backbone, batch.images), text))


class LanguageDeep(PromptMethod):
    """Deep text prompts; image features from the frozen tower."""

    inputs = ("image_features",)

    @classmethod
    def effective_options(cls, options: LanguageDeepOptions, backbone: BackboneInfo) -> EffectiveOptions:
        _check_ctx_init(backbone, options.ctx_init, options.n_ctx, "n_ctx")
        return _clamped(options, backbone, {"prompt_depth": backbone.text_depth})

    def __init__(self, backbone, classes: ClassSet, options: LanguageDeepOptions):
        super().__init__(backbone, classes, options)
        depth = prompt_depth(options.prompt_depth, backbone.text_depth)
        self.text = _DeepTextPrompts(backbone, options.n_ctx, options.ctx_init, depth, options.init_std)
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.text.set_classes(self.backbone, classes)

    def forward(self, batch: Batch) -> MethodOutput:
        text = self.cached("text_features", lambda: self.text.features(self.backbone))
        return MethodOutput(_logits(self.backbone, batch.image_features, text))


class VPTDeep(PromptMethod):
    """Deep image prompts; the classifier is the frozen text feature of one hand-written prompt."""

    inputs = ("images",)
    requires = ("vision_transformer",)

    @classmethod
    def effective_options(cls, options: VPTDeepOptions, backbone: BackboneInfo) -> EffectiveOptions:
        return _clamped(options, backbone, {"prompt_depth": backbone.vision_depth})

    def __init__(self, backbone, classes: ClassSet, options: VPTDeepOptions):
        super().__init__(backbone, classes, options)
        backbone.require("vision_transformer", "method 'vpt_deep'")
        if options.template.count("{}") != 1:
            raise UserError(f"method.template: {options.template!r} must hold the class name '{{}}' once")
        depth = prompt_depth(options.prompt_depth, backbone.vision_depth)
        self.vision = _DeepVisionPrompts(backbone, options.n_ctx, depth, options.init_std)
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.text_features = class_text_features(self.backbone, classes.names, [self.options.template])

    def forward(self, batch: Batch) -> MethodOutput:
        image = self.vision.features(self.backbone, batch.images)
        return MethodOutput(_logits(self.backbone, image, self.text_features.to(image.device)))


# ----------------------------------------------------------------------------- recipes

_REPO = "muzairkhattak/multimodal-prompt-learning"
#: Dassl's defaults the configs leave as they are (``OPTIM.MOMENTUM`` 0.9, ``OPTIM.WEIGHT_DECAY`` 5e-4,
#: cosine schedule) and what every config sets: batch 4, one constant warm-up epoch at 1e-5.
_TRAIN = {"optimizer": "sgd", "batch_size": 4, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1,
          "warmup_lr": 1e-5}
_TRANSFER = ["cross_dataset", "domain_generalisation"]

#: Base-to-novel (and few-shot, for which the repository has no config): ``vit_b16_c2_ep5_batch4_2ctx``;
#: cross-dataset and domain generalisation: ``vit_b16_c2_ep5_batch4_2ctx_cross_datasets`` (lr 0.0026, 2 epochs,
#: depth 3), as ``scripts/maple/xd_train_maple.sh`` runs it.
MAPLE_RECIPE = Recipe(
    train={**_TRAIN, "lr": 0.0035, "epochs": 5},
    options={"n_ctx": 2, "ctx_init": "a photo of a", "prompt_depth": 9},
    rules=[RecipeRule(when={"protocol": _TRANSFER}, train={"lr": 0.0026, "epochs": 2}, options={"prompt_depth": 3})],
    source=f"{_REPO} configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml (base2novel: "
    "scripts/maple/base2new_train_maple.sh), configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml "
    "(cross-dataset / DG: scripts/maple/xd_train_maple.sh); momentum, weight decay: Dassl defaults",
)
#: ``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml``, for every protocol (``scripts/independent-vlp/*``).
IVLP_RECIPE = Recipe(
    train={**_TRAIN, "lr": 0.0035, "epochs": 5},
    options={"n_ctx_text": 2, "n_ctx_vision": 2, "ctx_init": "a photo of a", "prompt_depth_text": 12,
             "prompt_depth_vision": 12},
    source=f"{_REPO} configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml (scripts/independent-vlp/"
    "base2new_train_ivlp.sh, xd_train_ivlp.sh); momentum, weight decay: Dassl defaults",
)
#: ``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml`` (``scripts/language-prompting/*``).
LANGUAGE_DEEP_RECIPE = Recipe(
    train={**_TRAIN, "lr": 0.0025, "epochs": 5},
    options={"n_ctx": 4, "ctx_init": "a photo of a", "prompt_depth": 12},
    source=f"{_REPO} configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml (scripts/"
    "language-prompting/base2new_train_lp.sh, xd_train_lp.sh); momentum, weight decay: Dassl defaults",
)
#: ``configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml`` (``scripts/vpt/*``); the template is ``trainers/vpt.py``'s.
VPT_DEEP_RECIPE = Recipe(
    train={**_TRAIN, "lr": 0.0025, "epochs": 5},
    options={"n_ctx": 8, "prompt_depth": 12, "template": "a photo of a {}."},
    source=f"{_REPO} configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml (scripts/vpt/base2new_train_vpt.sh, "
    "xd_train_vpt.sh), trainers/vpt.py (prompt 'a photo of a {}.'); momentum, weight decay: Dassl defaults",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    def of(name: str) -> tuple[Published, ...]:
        return Published.load(__name__, "published.yaml" if name == "maple" else f"published-{name}.yaml")

    return [
        MethodEntry("maple", MaPLeOptions, MaPLe, "MaPLe: coupled deep vision-language prompts", MAPLE_RECIPE,
                    published=of("maple")),
        MethodEntry("ivlp", IVLPOptions, IVLP, "IVLP: independent deep vision and language prompts", IVLP_RECIPE,
                    published=of("ivlp")),
        MethodEntry("language_deep", LanguageDeepOptions, LanguageDeep, "deep language prompts (frozen image tower)",
                    LANGUAGE_DEEP_RECIPE, published=of("language_deep")),
        MethodEntry("vpt_deep", VPTDeepOptions, VPTDeep, "deep VPT: deep vision prompts, hand-written classifier",
                    VPT_DEEP_RECIPE, published=of("vpt_deep")),
    ]
