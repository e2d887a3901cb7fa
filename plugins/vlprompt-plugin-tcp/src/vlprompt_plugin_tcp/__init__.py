"""TCP: "Textual-based Class-aware Prompt tuning for Visual-Language Model" (Yao, Zhang,
Xu, CVPR 2024).

A CoOp context (M random vectors before the class name) plus *class-aware* tokens: a small
network, the Textual Knowledge Embedding (TKE), maps each class's frozen hand-written text
feature to M tokens that replace the states at the context slots before an inner block of
the text tower (block 8 of 12 officially). Novel classes get their own tokens from their own
frozen features. The loss is KgCoOp's: ``CE + 8 * (1 - mean_c cos(w_c, w_c^clip))``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import (
    Batch,
    BlockContext,
    ClassSet,
    ContextHook,
    EffectiveOptions,
    MethodEntry,
    MethodOutput,
    Options,
    PromptMethod,
    Published,
)
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import (
    CLASS_NAME,
    Context,
    PromptTable,
    PromptTemplate,
    TemplateChoice,
    check_templates,
    class_text_features,
    init_context,
    templates_for,
)
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits


class TCPOptions(Options):
    """``method: {name: tcp, ...}`` (defaults: the official base-to-novel setting)."""

    n_ctx: int = Field(4, ge=1, description="context vectors M, and class-aware tokens per class")
    init_std: float = Field(0.02, gt=0, description="std of the random N(0, std^2) context initialisation")
    prompt: str = Field("{}.", description="the learned prompt's words after the context, '{}' the class name "
                        "(the recipe sets TCP's per-dataset prompts, e.g. '{}, a type of pet.')")
    class_layer: int = Field(8, ge=1, description="the text block (0-based) before which the class-aware tokens "
                             "replace the context slots (from 1, so that the context counts; at most the tower's "
                             "last block)")
    kg_weight: float = Field(8.0, ge=0, description="weight of 1 - mean cos to the hand-written prompt's features")
    templates: TemplateChoice = Field(
        "dataset", description="the hand-written prompt(s) of the frozen class features (the TKE's input and the "
        "pull's target): 'dataset', 'ensemble' or a list with '{}'")

    _has_slot = field_validator("templates")(check_templates)

    @field_validator("prompt")
    @classmethod
    def _one_class_name(cls, value: str) -> str:
        if value.count(CLASS_NAME) != 1:
            raise ValueError(f"the prompt needs the class name '{{}}' exactly once: {value!r}")
        return value


def used_class_layer(class_layer: int, text_depth: int | None) -> int:
    """The block the class-aware tokens enter: ``class_layer``, at most the last block."""
    return class_layer if text_depth is None else min(class_layer, text_depth - 1)


def prompt_template(n_ctx: int, prompt: str) -> PromptTemplate:
    """``[n_ctx context vectors] <words before> {} <words after>``."""
    before, after = (part.strip() for part in prompt.split(CLASS_NAME))
    return PromptTemplate(Context(0, n_ctx), *([before] if before else []), CLASS_NAME, *([after] if after else []))


def replace_slots_per_row(x: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, L, W]`` with position ``i`` of row ``r`` replaced by ``tokens[r, slots[r, i]]``
    where ``slots[r, i] >= 0`` (``tokens`` ``[N, M, W]``: each row its own)."""
    index = slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1])
    picked = tokens.to(x.dtype).gather(1, index)
    return torch.where((slots >= 0).unsqueeze(-1), picked, x)


class TCP(PromptMethod):
    inputs = ("image_features",)

    @classmethod
    def effective_options(cls, options, backbone):
        """``class_layer`` clamped to the text tower's last block."""
        if backbone.text_depth is not None and backbone.text_depth < 2:
            raise UserError(f"method 'tcp' needs a text tower of at least 2 blocks (class tokens enter after the "
                            f"first); this one has {backbone.text_depth}")
        used = used_class_layer(options.class_layer, backbone.text_depth)
        if used == options.class_layer:
            return EffectiveOptions(options)
        return EffectiveOptions(options.model_copy(update={"class_layer": used}),
                                (f"class_layer {options.class_layer} -> {used}: the text tower has "
                                 f"{backbone.text_depth} blocks",))

    def __init__(self, backbone, classes: ClassSet, options: TCPOptions):
        super().__init__(backbone, classes, options)
        self.class_layer = used_class_layer(options.class_layer, backbone.text_depth)
        self.ctx = nn.Parameter(init_context(backbone, options.n_ctx, std=options.init_std))
        dim, hidden = backbone.embed_dim, backbone.embed_dim // 4
        if hidden < 1:
            raise UserError(f"method 'tcp' needs text features of at least 4 dimensions, got {dim}")
        self.tke = nn.Sequential(OrderedDict([  # the Textual Knowledge Embedding
            ("linear1", nn.Linear(dim, hidden)),
            ("gelu", QuickGELU()),
            ("linear2", nn.Linear(hidden, options.n_ctx * backbone.text_width)),
        ])).to(backbone.positional_embedding.device)
        self.template = prompt_template(options.n_ctx, options.prompt)
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.prompts = PromptTable(self.backbone, classes.names, self.template)
        prior = class_text_features(self.backbone, classes.names, templates_for(self.options.templates, classes))
        self.register_buffer("prior", prior, persistent=False)  # [C, D] unit, frozen

    def class_tokens(self) -> torch.Tensor:
        """``[C, M, text_width]``: each class's tokens, from its frozen text feature."""
        return self.tke(self.prior).reshape(len(self.prior), self.options.n_ctx, self.backbone.text_width)

    def text_features(self) -> torch.Tensor:
        """``[C, D]`` class text features: the context, then the class tokens at the context
        slots before block ``class_layer``."""
        tokens = self.class_tokens()

        def insert(layer: int, x: torch.Tensor, context: BlockContext) -> torch.Tensor:
            if layer != self.class_layer:
                return x
            return replace_slots_per_row(x, context.slots, tokens[context.classes])

        return self.prompts.encode(self.backbone, self.ctx, block_hook=ContextHook(insert))

    def forward(self, batch: Batch) -> MethodOutput:
        text = self.cached("text_features", self.text_features)  # static: once per evaluation
        logits = cosine_logits(batch.image_features.float(), text.float(), self.backbone.logit_scale)
        losses = {}
        if self.training and self.options.kg_weight > 0:
            cos = (F.normalize(text.float(), dim=-1) * self.prior).sum(-1)
            losses["kg"] = self.options.kg_weight * (1.0 - cos.mean())
        return MethodOutput(logits, losses=losses)


class QuickGELU(nn.Module):
    """CLIP's ``x * sigmoid(1.702 x)``, the TKE's activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


#: htyao89/Textual-based_Class-aware_prompt_tuning ``trainers/tcp.py``: the learned prompt
#: after the 4 context vectors (CUSTOM_TEMPLATES, whose "X X X X" / "a photo of a" are the
#: context slots) where it is not "{}.", and the hand-written prompt of the frozen features
#: (CUSTOM_TEMPLATES_ori) where it differs from the dataset's own (CoOp's) template.
PROMPTS = {
    "oxford_pets": "{}, a type of pet.",
    "oxford_flowers": "{}, a type of flower.",
    "fgvc_aircraft": "{}, a type of aircraft.",
    "dtd": "{} texture.",
    "stanford_cars": "{}, a type of car",
    "food101": "{}, a type of food.",
    "ucf101": "person doing {}.",
}
TEMPLATES = {
    "fgvc_aircraft": "a photo of an aircraft {}.",
    "dtd": "a photo of a {}, a type of texture.",
    "food101": "a photo of a {}, a type of food.",
}

#: The official recipe (``configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml``, ``scripts/base2new_train.sh``):
#: Adam (``OPTIM.NAME: "adam"``: Dassl's ``build_optimizer`` makes ``torch.optim.Adam``, an L2 weight
#: decay, Dassl's default ``WEIGHT_DECAY`` 5e-4, betas ``ADAM_BETA1/2`` 0.9 and 0.999, ``eps`` 1e-3 as
#: the official README patches ``dassl/optim/optimizer.py``), lr 0.002, batch 32, 50 epochs, cosine
#: after one constant warm-up epoch at 1e-5; 4 random context vectors.
RECIPE = Recipe(
    train={"optimizer": "adam", "adam_eps": 1e-3, "lr": 0.002, "batch_size": 32, "epochs": 50,
           "weight_decay": 5e-4, "warmup_epochs": 1, "warmup_lr": 1e-5},
    options={"n_ctx": 4, "class_layer": 8, "kg_weight": 8.0},
    rules=[
        *[RecipeRule(when={"dataset": name}, options={"prompt": prompt}) for name, prompt in PROMPTS.items()],
        *[RecipeRule(when={"dataset": name}, options={"templates": [t]}) for name, t in TEMPLATES.items()],
    ],
    source="htyao89/Textual-based_Class-aware_prompt_tuning configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml, "
    "scripts/base2new_train.sh, trainers/tcp.py (CUSTOM_TEMPLATES, CUSTOM_TEMPLATES_ori), README (Adam eps 1e-3 "
    "patched into Dassl's dassl/optim/optimizer.py); weight decay, betas: Dassl defaults (dassl/config/defaults.py)",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("tcp", TCPOptions, TCP,
                        "TCP: class-aware tokens from the classes' text features, inside the text tower", RECIPE,
                        published=Published.load(__name__))]
