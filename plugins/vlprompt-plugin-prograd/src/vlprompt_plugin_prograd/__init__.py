"""ProGrad: "Prompt-aligned Gradient for Prompt Tuning" (Zhu, Niu, Han, Wu, Zhang, ICCV 2023).

CoOp's context (16 vectors, the last ones initialised from the hand-written prompt's words),
trained on cross-entropy only, but each step follows a *prompt-aligned* gradient: where the
cross-entropy's gradient ``g`` conflicts with the gradient ``g_kl`` of the distillation
loss towards zero-shot CLIP (``g . g_kl < 0``), its component along ``g_kl`` is removed:
``g - lambda (g . u) u`` with ``u = g_kl / |g_kl|``, per parameter tensor. The
distillation loss itself is never descended; it only decides the direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import Batch, ClassSet, MethodEntry, MethodOutput, Options, PromptMethod, Published
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


class ProGradOptions(Options):
    """``method: {name: prograd, ...}`` (defaults: the official setting)."""

    n_ctx: int = Field(16, ge=1, description="number of context vectors M")
    init_from_template: bool = Field(
        True, description="initialise the last context vectors from the words before '{}' of the first hand-written "
        "template (the others zero), as the official code; false: N(0, init_std^2)")
    init_std: float = Field(0.02, gt=0, description="std of the random initialisation")
    prograd_lambda: float = Field(1.0, ge=0, description="how much of the conflicting component is removed (1: all)")
    temperature: float = Field(1.0, gt=0, description="T of the distillation loss towards zero-shot CLIP")
    templates: TemplateChoice = Field(
        "dataset", description="the hand-written prompt(s) of zero-shot CLIP (and of the initial context): "
        "'dataset', 'ensemble' or a list with '{}' (the recipe sets ProGrad's own per-dataset templates)")

    _has_slot = field_validator("templates")(check_templates)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2`` times the cross-entropy of the student's ``softmax(logits / T)`` against the
    teacher's ``softmax(teacher / T)``, averaged over the batch (the KL up to the teacher's
    entropy, a constant: the same gradient)."""
    target = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return -(target * F.log_softmax(logits.float() / temperature, dim=-1)).sum(-1).mean() * temperature**2


def project_conflict(grad: torch.Tensor, reference: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``grad`` with ``strength`` times its component along ``reference`` removed when the two
    point apart (``grad . reference < 0``); else ``grad`` as it is."""
    dot = (grad.flatten() * reference.flatten()).sum()
    if dot >= 0:
        return grad
    unit = reference / torch.linalg.norm(reference)
    return grad - strength * (grad.flatten() * unit.flatten()).sum() * unit


class ProGrad(PromptMethod):
    inputs = ("image_features",)

    def __init__(self, backbone, classes: ClassSet, options: ProGradOptions):
        super().__init__(backbone, classes, options)
        if options.init_from_template:
            self.template, ctx = self._from_template(templates_for(options.templates, classes)[0])
        else:
            self.template = PromptTemplate.with_context(options.n_ctx)
            ctx = init_context(backbone, options.n_ctx, std=options.init_std)
        self.ctx = nn.Parameter(ctx)
        self.set_classes(classes)

    def _from_template(self, template: str) -> tuple[PromptTemplate, torch.Tensor]:
        """The official initialisation from a template "<words> {}.": with w words, the last
        w context vectors are the first w tokens' embeddings, the others zero; tokens past
        the first w (a word that is two tokens, like "pet,") stay fixed words before the
        class name."""
        bb, n = self.backbone, self.options.n_ctx
        phrase = template.split(CLASS_NAME)[0].strip()
        words = phrase.split()
        if not words or len(words) > n:
            raise UserError(f"method.templates: the context starts from the words before '{{}}' of {template!r}, "
                            f"which must be 1 to n_ctx ({n}) words; set init_from_template: false or another template")
        ids = bb.tokenize_words(phrase)
        w = len(words)
        head = next((k for k in range(1, w + 1) if len(bb.tokenize_words(" ".join(words[:k]))) == w), None)
        if head is None:
            raise UserError(f"method.templates: the first {w} tokens of {phrase!r} end inside a word; "
                            "set init_from_template: false or another template")
        rest = " ".join(words[head:])
        ctx = torch.zeros(n, bb.text_width, device=bb.positional_embedding.device)
        with torch.no_grad():
            ctx[n - w:] = bb.embed_tokens(torch.tensor(ids[:w], device=ctx.device)).float()
        return PromptTemplate(Context(0, n), *([rest] if rest else []), CLASS_NAME, "."), ctx

    def set_classes(self, classes: ClassSet) -> None:
        self.prompts = PromptTable(self.backbone, classes.names, self.template)
        zero_shot = class_text_features(self.backbone, classes.names, templates_for(self.options.templates, classes))
        self.register_buffer("zero_shot", zero_shot, persistent=False)  # [C, D] unit, frozen

    def text_features(self) -> torch.Tensor:
        """``[C, D]`` class text features from the current context."""
        return self.prompts.encode(self.backbone, self.ctx)

    def forward(self, batch: Batch) -> MethodOutput:
        text = self.cached("text_features", self.text_features)  # static: once per evaluation
        image = batch.image_features.float()
        logits = cosine_logits(image, text.float(), self.backbone.logit_scale)
        losses = {}
        if self.training:
            teacher = cosine_logits(image, self.zero_shot, self.backbone.logit_scale)
            losses["kl"] = distillation_loss(logits, teacher, self.options.temperature)
        return MethodOutput(logits, losses=losses)

    def loss(self, output: MethodOutput, batch: Batch) -> torch.Tensor:
        """Cross-entropy alone: the distillation term only shapes its gradient (:meth:`backward`)."""
        return F.cross_entropy(output.logits.float(), batch.labels)

    def backward(self, loss: torch.Tensor, output: MethodOutput, batch: Batch) -> None:
        """The cross-entropy's gradients, each projected against the distillation loss's
        gradient of the same tensor where they conflict."""
        params = [p for p in self.parameters() if p.requires_grad]
        guides = torch.autograd.grad(output.losses["kl"], params, retain_graph=True, allow_unused=True)
        loss.backward()
        with torch.no_grad():
            for p, guide in zip(params, guides):
                if p.grad is not None and guide is not None:
                    p.grad = project_conflict(p.grad, guide, self.options.prograd_lambda)


#: Prompt-align ``ProGrad.public/trainers/prograd.py`` CUSTOM_TEMPLATES where they differ from
#: the datasets' own (CoOp's) templates.
TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "food101": "a type of food, a photo of {}.",
}

#: The official recipe (BeierZhu/Prompt-align ``ProGrad.public/configs/trainers/ProGrad/rn50*.yaml``,
#: ``scripts/prograd.sh``, ``scripts/base2new_train_prograd.sh``, README): SGD lr 0.002, batch 32,
#: cosine after one constant warm-up epoch at 1e-5, 16 context vectors, lambda 1, T 1; epochs
#: by shots (1: 50, 2-4: 100, 8-16: 200), 100 for base-to-novel; lambda 0.8 on Flowers, DTD
#: and EuroSAT at 8 and 16 shots (README).
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.002, "batch_size": 32, "epochs": 200, "momentum": 0.9, "weight_decay": 5e-4,
           "warmup_epochs": 1, "warmup_lr": 1e-5},
    options={"n_ctx": 16, "init_from_template": True, "prograd_lambda": 1.0, "temperature": 1.0},
    rules=[
        RecipeRule(when={"shots": 1}, train={"epochs": 50}),
        RecipeRule(when={"shots": [2, 4]}, train={"epochs": 100}),
        RecipeRule(when={"protocol": "base2novel"}, train={"epochs": 100}),
        RecipeRule(when={"protocol": "few_shot", "shots": [8, 16], "dataset": ["oxford_flowers", "dtd", "eurosat"]},
                   options={"prograd_lambda": 0.8}),
        *[RecipeRule(when={"dataset": name}, options={"templates": [t]}) for name, t in TEMPLATES.items()],
    ],
    source="BeierZhu/Prompt-align ProGrad.public/configs/trainers/ProGrad (rn50, rn50_ep100, rn50_ep50), "
    "scripts/prograd.sh, scripts/base2new_train_prograd.sh, README (lambda 0.8), trainers/prograd.py CUSTOM_TEMPLATES",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("prograd", ProGradOptions, ProGrad,
                        "ProGrad: CoOp trained along the cross-entropy gradient that agrees with zero-shot CLIP",
                        RECIPE, published=Published.load(__name__))]
