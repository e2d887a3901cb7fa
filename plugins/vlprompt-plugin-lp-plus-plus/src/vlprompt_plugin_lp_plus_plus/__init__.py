"""LP++: "A Surprisingly Strong Linear Probe for Few-Shot CLIP" (Huang, Shakeri, Dolz,
Boudiaf, Bahig, Ben Ayed; CVPR 2024), as its official code computes it.

A linear probe on the frozen, L2-normalised image features ``f`` whose class weights blend
a visual prototype with the class's frozen text embedding ``t_c``:

    logit_c(f) = <f, w_c> + b_c + alpha_c <f, t_c>

fitted by the method itself, before (and instead of) the engine's gradient steps
(:meth:`LPPlusPlus.before_training`): full-batch gradient descent on the cross-entropy of
the training features (one augmented view per image), with step sizes from the data
(``4 N / lambda_max(F^T F)`` for ``w, b``, SGD with momentum 0.9; ``N / (4 max_c
sum_i <f_i, t_c>^2)`` for ``alpha``, which steps every 10 iterations along its gradient
summed since the start), ``w`` started at the class sums of the features, ``b`` as
``nn.Linear`` draws it, every ``alpha_c`` at 250 times the mean text logit of the true
class, and the iterate kept that classifies the validation split best. The classifier
(``w``, ``b``, ``alpha`` and the text embeddings) is kept in fitted buffers; the method
has no trainable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import Batch, ClassSet, FrozenData, MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.prompting import (
    TemplateChoice,
    check_templates,
    class_text_features,
    names_of,
    names_tensor,
    rows_by_name,
    templates_for,
)
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits

#: The official code's constants: the momentum of the prototypes' SGD and the factor of
#: the blending weights' initial value (``methods/linear_probe_p2.py``).
MOMENTUM = 0.9
ALPHA_INIT_FACTOR = 250.0


class LPPlusPlusOptions(Options):
    """``method: {name: lp_plus_plus, ...}`` (defaults: the official settings)."""

    iterations: int = Field(300, ge=1, le=100_000, description="full-batch gradient steps on the training features "
                            "(the official train_epoch: 300)")
    alpha_every: int = Field(10, ge=1, le=100_000, description="the blending weights alpha step once every this "
                             "many iterations, along their gradient summed since the first (the official code: 10)")
    select: Literal["val", "last"] = Field(
        "val", description="'val': keep the iterate that classifies the validation split best (the last one to "
        "reach that accuracy), as the official code; 'last': the final iterate (also used when the plan has no "
        "validation images)")
    augment: bool = Field(True, description="fit on one augmented view of each training image (train.crop_scale, "
                          "flip; the recipe's crop scale is the official 0.5-1), as the official code; false: on "
                          "its centre crop")
    templates: TemplateChoice = Field(
        "dataset", description="the hand-written prompt(s) of the class text embeddings t_c: 'dataset' (its own "
        "template), 'ensemble' (the mean over the dataset's ensemble; the recipe's choice on ImageNet) or a list "
        "with '{}'")

    _has_slot = field_validator("templates")(check_templates)


# ------------------------------------------------------------------------------ the fit


@dataclass
class LPPlusPlusFit:
    """What :func:`fit_lp_plus_plus` found: the classifier kept (``weight`` ``[C, D]``,
    ``bias`` ``[C]``, ``alpha`` ``[C]``) and how (the step sizes, the initial blending
    weight, the 0-based iteration kept and its correct validation predictions, None
    without a validation split or with ``select="last"``)."""

    weight: torch.Tensor
    bias: torch.Tensor
    alpha: torch.Tensor
    lr_w: float
    lr_alpha: float
    alpha_init: float
    iteration: int
    val_correct: int | None


def step_sizes(features: torch.Tensor, text_logits: torch.Tensor) -> tuple[float, float]:
    """The data-driven learning rates of the official code, from the unit training
    features ``F`` ``[N, D]`` and their text logits ``<f_i, t_c>`` ``[N, C]``:
    ``4 N / lambda_max(F^T F)`` for the prototypes and bias, ``N / (4 max_c sum_i
    <f_i, t_c>^2)`` for the blending weights. The eigenvalue is taken in float64."""
    n = features.shape[0]
    top = torch.linalg.eigvalsh((features.T @ features).double()).max().item()
    column = text_logits.pow(2).sum(0).max().item()
    return 4.0 * n / top, n / (4.0 * column)


def initial_alpha(text_logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """250 times the mean over classes of the mean text logit ``<f_i, t_c>`` of the
    class's own training images (classes without images left out)."""
    onehot = F.one_hot(labels, n_classes).to(text_logits.dtype)
    counts = onehot.sum(0)
    own = (onehot * text_logits / counts.clamp(min=1)).sum(0)  # [C]: mean over class c of <f_i, t_c>
    return ALPHA_INIT_FACTOR * own[counts > 0].double().mean().item()


def initial_prototypes(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``[C, D]``: the sum of each class's unit training features (the official
    ``compute_centroids``, whose division by the class count is commented out)."""
    return F.one_hot(labels, n_classes).to(features.dtype).T @ features


def initial_bias(dim: int, n_classes: int) -> torch.Tensor:
    """``[C]``: the bias a fresh ``nn.Linear(dim, n_classes)`` draws (uniform in
    ``+-1/sqrt(dim)``, after its weight's draw, from torch's CPU generator), as the
    official classifier starts; its weight is then replaced by the prototypes."""
    return nn.Linear(dim, n_classes).bias.detach()


def fit_lp_plus_plus(
    features: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    iterations: int = 300,
    alpha_every: int = 10,
) -> LPPlusPlusFit:
    """LP++'s full-batch optimisation, as ``LinearProbe_P2.forward`` runs it.

    ``features`` ``[N, D]`` and ``val_features`` ``[M, D]`` are unit image features,
    ``text`` ``[C, D]`` the unit class text embeddings, ``labels`` index its rows. Each
    iteration: the logits ``F w^T + b + alpha * (F t^T)``, their mean cross-entropy, one
    SGD step (momentum 0.9, no weight decay) of ``w`` and ``b`` at ``4 N / lambda_max``;
    every ``alpha_every``-th iteration ``alpha`` steps at its own rate along its
    gradient *summed over every iteration so far* (the official code never zeroes it);
    then, with a validation split, the iterate is kept if it classifies at least as
    many validation images correctly as the best so far. Draws the initial bias from
    torch's CPU generator (:func:`initial_bias`)."""
    n_classes, dim = text.shape
    features, text = features.float(), text.float()
    text_logits = features @ text.T  # <f_i, t_c>: unit vectors (a plain product, as the official code's)
    lr_w, lr_alpha = step_sizes(features, text_logits)
    alpha_init = initial_alpha(text_logits, labels, n_classes)

    weight = initial_prototypes(features, labels, n_classes).requires_grad_(True)
    bias = initial_bias(dim, n_classes).to(features.device).requires_grad_(True)
    alpha = torch.full((n_classes,), alpha_init, device=features.device).requires_grad_(True)
    optimizer = torch.optim.SGD([weight, bias], lr=lr_w, momentum=MOMENTUM)

    validate = val_features is not None and val_labels is not None and len(val_labels) > 0
    val_text = val_features.float() @ text.T if validate else None
    best, kept = -1, None
    for iteration in range(iterations):
        logits = F.linear(features, weight, bias) + alpha * text_logits
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (iteration + 1) % alpha_every == 0:
            with torch.no_grad():
                alpha -= lr_alpha * alpha.grad
        if validate:
            with torch.no_grad():
                val_logits = F.linear(val_features.float(), weight, bias) + alpha * val_text
                correct = int((val_logits.argmax(dim=1) == val_labels).sum())
            if correct >= best:
                best = correct
                kept = (weight.detach().clone(), bias.detach().clone(), alpha.detach().clone(), iteration)
    if kept is None:
        kept = (weight.detach(), bias.detach(), alpha.detach(), iterations - 1)
    w, b, a, iteration = kept
    return LPPlusPlusFit(w, b, a, lr_w, lr_alpha, alpha_init, iteration, best if validate else None)


# ------------------------------------------------------------------------------ the method


class LPPlusPlus(PromptMethod):
    """LP++ on frozen image features; see the module docstring.

    Fitted tensors (buffers, saved in the checkpoint): ``weight`` ``[C, D]``, ``bias`` ``[C]``,
    ``alpha`` ``[C]``, ``text`` ``[C, D]`` (the unit text embeddings the fit used), and
    ``class_names`` (the fitted classes' names, UTF-8 JSON), so that a loaded classifier
    scores its classes by name. Before :meth:`before_training` the classifier is the
    text embeddings alone (``w = 0``, ``b = 0``, ``alpha = 1``: cosine similarities)."""

    inputs = ("image_features",)

    def __init__(self, backbone, classes: ClassSet, options: LPPlusPlusOptions):
        super().__init__(backbone, classes, options)
        text = self._text_embeddings(classes)
        n_classes, dim = text.shape
        self.register_fitted("weight", torch.zeros(n_classes, dim))
        self.register_fitted("bias", torch.zeros(n_classes))
        self.register_fitted("alpha", torch.ones(n_classes))
        self.register_fitted("text", text)
        self.register_fitted("class_names", names_tensor(classes.names))
        self.last_fit: LPPlusPlusFit | None = None
        self.set_classes(classes)

    def _text_embeddings(self, classes: ClassSet) -> torch.Tensor:
        return class_text_features(self.backbone, list(classes.names), templates_for(self.options.templates, classes))

    @classmethod
    def fixed_classes(cls, options: LPPlusPlusOptions) -> str | None:
        return ("LP++ learns a visual prototype and a blending weight for each training class from its images, so "
                "it scores those classes (or some of them) only")

    def fitted_names(self) -> list[str]:
        """The names of the classes the classifier's rows belong to."""
        return names_of(self.class_names)

    def _rows(self, names: list[str]) -> list[int]:
        """The fitted row of each of ``names`` (see :func:`~vlprompt_core.prompting.rows_by_name`:
        a repeated name takes its rows in order, as ImageNet names two classes twice)."""
        fitted = self.fitted_names()

        def refuse(missing: list[str]) -> str:
            shown = ", ".join(repr(n) for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
            return (f"lp_plus_plus cannot score classes it was not fitted on: {shown} ({len(missing)} of "
                    f"{len(names)}); LP++ learns a visual prototype and a blending weight for each of its "
                    f"{len(fitted)} training classes from their images, so it scores those (or some of them) only, "
                    "not base-to-novel's novel classes nor another dataset's")

        return rows_by_name(names, fitted, refuse)

    def set_classes(self, classes: ClassSet) -> None:
        """Score ``classes``: the fitted classes (any order, or some of them), by name;
        other names are a :class:`~vlprompt_core.errors.UserError`."""
        self._rows(list(classes.names))  # refused here, one line, when they are not the fitted ones
        self.scored = list(classes.names)

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w, b, alpha, t)`` of the current classes (rows found by name in the fitted
        ones, which a loaded checkpoint may have brought)."""
        rows = self._rows(self.scored)
        if rows == list(range(self.weight.shape[0])):  # the fitted classes in their order: no copy
            return self.weight, self.bias, self.alpha, self.text
        index = torch.tensor(rows, dtype=torch.long, device=self.weight.device)
        return self.weight[index], self.bias[index], self.alpha[index], self.text[index]

    def forward(self, batch: Batch) -> MethodOutput:
        weight, bias, alpha, text = self.classifier()
        raw = batch.image_features.float()
        unit = F.normalize(raw, dim=-1)
        logits = F.linear(unit, weight.float(), bias.float()) + alpha.float() * cosine_logits(raw, text.float(), 1.0)
        return MethodOutput(logits)

    def before_training(self, data: FrozenData) -> None:
        """Fit the classifier on ``data`` (see :func:`fit_lp_plus_plus`)."""
        options = self.options
        train = data.train(views=1 if options.augment else 0)
        features = train.features[0] if train.features.dim() == 3 else train.features
        device = features.device
        text = self._text_embeddings(data.classes).to(device)
        val_features = val_labels = None
        if options.select == "val":
            val = data.val()
            val_features, val_labels = F.normalize(val.features.float(), dim=-1), val.labels
        with torch.autocast(device.type, enabled=False):
            fit = fit_lp_plus_plus(F.normalize(features.float(), dim=-1), train.labels, text, val_features,
                                   val_labels, options.iterations, options.alpha_every)
        self.weight, self.bias, self.alpha, self.text = fit.weight, fit.bias, fit.alpha, text
        self.class_names = names_tensor(data.classes.names).to(device)
        self.last_fit = fit
        self.set_classes(data.classes)


# ------------------------------------------------------------------------------ registration

#: The official settings (FereshteShakeri/FewShot-CLIP-Strong-Baseline): ``configs/base.yaml``
#: (``train_epoch: 300``), ``main.py`` (the training transform: RandomResizedCrop scale
#: 0.5-1, bicubic, flip; one pass over the training images), ``methods/linear_probe_p2.py``
#: (the fit), ``datasets/imagenet.py`` (ImageNet's 7 templates alone). No gradient steps of
#: the engine: the fit is the method's own.
RECIPE = Recipe(
    train={"epochs": 0, "crop_scale": [0.5, 1.0]},
    options={"iterations": 300, "alpha_every": 10, "select": "val", "augment": True},
    rules=[RecipeRule(when={"dataset": "imagenet"}, options={"templates": "ensemble"},
                      note="datasets/imagenet.py: the 7 ImageNet templates alone")],
    source="FereshteShakeri/FewShot-CLIP-Strong-Baseline configs/base.yaml (train_epoch 300), main.py (train "
    "transform, scale 0.5-1), methods/linear_probe_p2.py, datasets/imagenet.py (imagenet_templates)",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("lp_plus_plus", LPPlusPlusOptions, LPPlusPlus,
                        "LP++: a linear probe on frozen image features blending visual prototypes with the class "
                        "text embeddings, fitted by full-batch descent with data-driven step sizes", RECIPE)]
