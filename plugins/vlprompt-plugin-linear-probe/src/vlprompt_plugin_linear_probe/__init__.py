"""Linear-probe CLIP, the few-shot baseline of CoOp ("Learning to Prompt for Vision-Language
Models", Zhou, Yang, Loy, Liu; IJCV 2022), as its code runs it (KaiyangZhou/CoOp ``lpclip/``),
after CLIP's own protocol (Radford et al. 2021, appendix A.3).

A multinomial logistic regression with an L2 penalty (scikit-learn, L-BFGS, at most 1,000
iterations) on the frozen image features of the training shots: one view per image under the
test transform (resize, centre crop; no augmentation), raw (not normalised). Its inverse
regularisation strength C is chosen on the validation split alone: the fits at C = 1e6, 1e4,
..., 1e-6 give a peak, then 8 bisection steps in log10 C between C/10 and 10 C each keep the
end whose fit classifies more validation images right (the smaller C on a tie). The classifier
is the fit at the last C kept, on the training shots only. Its scores are the fit's decision
values ``x W^T + b``; nothing trains by gradient steps, everything it learns is a fitted
buffer (``weight``, ``bias``, ``C``, ``class_names``). It scores the classes it was fitted on
(in any order, or some of them) and no other (:meth:`LinearProbe.fixed_classes`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from pydantic import Field

from vlprompt_core import hookimpl
from vlprompt_core.api import (
    Batch,
    ClassSet,
    FrozenData,
    FrozenFeatures,
    MethodEntry,
    MethodOutput,
    Options,
    PromptMethod,
)
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import names_of, names_tensor, rows_by_name
from vlprompt_core.recipes import Recipe

#: The coarse grid of C (``search_list`` of lpclip/linear_probe.py), weakest regularisation first.
GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)

#: Why it scores only its own classes (:meth:`LinearProbe.fixed_classes`).
FIXED = ("a linear probe has a row of weights for each class it was fitted on, so it scores those classes "
         "(or some of them) only")


class LinearProbeOptions(Options):
    """``method: {name: linear_probe, ...}`` (defaults: the official setting)."""

    C: float | None = Field(None, gt=0, description="inverse strength of the L2 penalty; unset (the official "
                            "setting): searched on the validation split")
    search_steps: int = Field(8, ge=0, le=100, description="bisection steps in log10 C after the coarse grid "
                              "1e6, 1e4, ..., 1e-6 (the official --num_step 8; 0: the grid's best C)")
    max_iter: int = Field(1000, ge=1, description="L-BFGS iterations per fit (the official 1000)")


def search_c(score: Callable[[float], float], steps: int = 8, grid: Sequence[float] = GRID
             ) -> tuple[float, list[tuple[float, float]]]:
    """The C that lpclip/linear_probe.py chooses, given ``score(C)``: the validation accuracy
    (or count of right answers) of the fit at C. Returns it, and every ``(C, score)`` asked
    for, in order.

    The grid's best C (the first, i.e. the weakest penalty, among ties) gives the interval
    ``[C/10, 10 C]``; each step scores both ends, keeps the better (the left, smaller C, on a
    tie) and moves the other end to the middle in log10 C. The C kept by the last step is the
    answer (with ``steps=0``, the grid's best). The arithmetic is the official one (log10 and
    power of 10 of each end, every step), so the same scores give the same C to the bit."""
    tried: list[tuple[float, float]] = []

    def scored(c: float) -> float:
        value = score(c)
        tried.append((c, value))
        return value

    peak = grid[int(np.argmax([scored(c) for c in grid]))]
    chosen = peak
    left, right = 1e-1 * peak, 1e1 * peak
    for _ in range(steps):
        at_left, at_right = scored(left), scored(right)
        log_left, log_right = np.log10(left), np.log10(right)
        middle = 0.5 * (log_right + log_left)
        if at_left < at_right:
            chosen, log_left = right, middle
        else:
            chosen, log_right = left, middle
        left, right = np.power(10, log_left), np.power(10, log_right)
    return float(chosen), [(float(c), s) for c, s in tried]


def fit_logistic(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int = 1000):
    """scikit-learn's L2-penalised logistic regression (L-BFGS; multinomial for more than two
    classes), as lpclip/linear_probe.py fits it. Not converging within ``max_iter`` is not an
    error (the official code goes on too; at C = 1e6 it is common)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(solver="lbfgs", C=C, max_iter=max_iter).fit(features, labels)


def linear_head(clf, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``W [n_classes, D]`` and ``b [n_classes]`` such that ``x W^T + b`` are the fitted
    classifier's scores per class: its ``decision_function`` for more than two classes; for
    two, whose one decision value z scores the second class, the rows ``[0, z]`` (same
    arg-max, and their softmax is the fit's ``predict_proba``)."""
    coef, intercept = np.asarray(clf.coef_, np.float64), np.asarray(clf.intercept_, np.float64)
    if coef.shape[0] == 1:
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight, bias = np.zeros((n_classes, coef.shape[1])), np.zeros(n_classes)
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    return weight, bias


def _numpy(split: FrozenFeatures) -> tuple[np.ndarray, np.ndarray]:
    return split.features.detach().to("cpu", torch.float64).numpy(), split.labels.detach().cpu().numpy()


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def rows_of(names: list[str], fitted: list[str]) -> list[int]:
    """The classifier row of each of ``names`` among the ``fitted`` classes' (in any order, or
    some of them); a name the fitted classes repeat (ImageNet's 'missile', labels 657 and 744)
    takes its rows in order. A name not among them is a one-line :class:`UserError`."""
    return rows_by_name(names, fitted, lambda unknown: (
        f"{_listed(unknown)} {'is' if len(unknown) == 1 else 'are'} not among the {len(fitted)} classes it was "
        "fitted on: a linear probe has weights for those classes only (base-to-novel's novel classes and another "
        "dataset's need a method that reads class names)"))


class LinearProbe(PromptMethod):
    """Fitted tensors (buffers, saved in the checkpoint): ``weight`` ``[C, D]`` and ``bias``
    ``[C]`` (fp32), ``C`` (the chosen C, fp64) and ``class_names`` (the fitted classes' names,
    UTF-8 JSON), so that a loaded classifier scores its classes by name. Before
    :meth:`before_training` every score is 0."""

    inputs = ("image_features",)

    @classmethod
    def fixed_classes(cls, options: LinearProbeOptions) -> str | None:
        return FIXED

    def __init__(self, backbone, classes: ClassSet, options: LinearProbeOptions):
        super().__init__(backbone, classes, options)
        # placeholders until before_training fits them (a checkpoint brings its own shapes)
        self.register_fitted("weight", torch.zeros(len(classes), backbone.embed_dim))
        self.register_fitted("bias", torch.zeros(len(classes)))
        self.register_fitted("C", torch.zeros((), dtype=torch.float64))
        self.register_fitted("class_names", names_tensor(classes.names))
        #: ``(C, validation images right)`` of every fit the last search scored, in order (not saved).
        self.search: list[tuple[float, float]] = []
        self.set_classes(classes)

    def fitted_names(self) -> list[str]:
        """The names of the classes the classifier's rows belong to."""
        return names_of(self.class_names)

    def set_classes(self, classes: ClassSet) -> None:
        """The classes it was fitted on, in any order, or some of them (e.g. ImageNet-A's 200 of
        ImageNet's 1000): their rows of the classifier. Other names cannot be scored."""
        rows_of(list(classes.names), self.fitted_names())  # refused here, one line
        self.scored = list(classes.names)

    def forward(self, batch: Batch) -> MethodOutput:
        x = batch.image_features.float()
        weight, bias = self.weight.float(), self.bias.float()
        rows = self.cached("rows", lambda: rows_of(self.scored, self.fitted_names()))  # once per evaluation
        if rows != list(range(weight.shape[0])):
            index = torch.tensor(rows, dtype=torch.long, device=weight.device)
            weight, bias = weight[index], bias[index]
        with torch.autocast(x.device.type, enabled=False):  # fp32 scores, as close to the fp64 fit as features allow
            return MethodOutput(torch.addmm(bias, x, weight.t()))

    def before_training(self, data: FrozenData) -> None:
        """The official search and fit (see the module docstring) on ``data``'s training and
        validation features; what it chose goes in the fitted buffers."""
        names = list(data.classes.names)
        x, y = _numpy(data.train())  # one view per image, test transform: as lpclip/feat_extractor.py
        missing = [names[c] for c in sorted(set(range(len(names))) - set(y.tolist()))]
        if len(names) < 2 or missing:
            why = f"no training image of {_listed(missing)}" if missing else f"{len(names)} class"
            raise UserError(f"linear_probe fits a classifier over every training class and needs two or more, "
                            f"each with training images: {why}")
        kept: dict[float, object] = {}  # the last two fits: the chosen C is one of them

        def fitted(c: float):
            if c not in kept:
                kept[c] = fit_logistic(x, y, c, self.options.max_iter)
                while len(kept) > 2:
                    kept.pop(next(iter(kept)))
            return kept[c]

        if self.options.C is not None:
            chosen, self.search = float(self.options.C), []
        else:
            val = data.val()
            if len(val) == 0:
                raise UserError("method.C: linear_probe chooses C on the validation split, and this run has no "
                                "validation images; set method.C (e.g. 1.0) to fit at a given C")
            xv, yv = _numpy(val)
            right: dict[float, int] = {}  # C -> validation images right (a C met again is not refitted)

            def score(c: float) -> int:
                if c not in right:
                    right[c] = int((fitted(c).predict(xv) == yv).sum())
                return right[c]

            chosen, self.search = search_c(score, self.options.search_steps)
        weight, bias = linear_head(fitted(chosen), len(names))
        device = self.weight.device
        self.weight = torch.as_tensor(weight, dtype=torch.float32).to(device)
        self.bias = torch.as_tensor(bias, dtype=torch.float32).to(device)
        self.C = torch.tensor(chosen, dtype=torch.float64, device=device)
        self.class_names = names_tensor(names).to(self.class_names.device)
        self.set_classes(data.classes)

    def after_training(self, data: FrozenData) -> None:
        """Nothing: the search is the fit (each C is scored by refitting), done in
        :meth:`before_training`."""


#: KaiyangZhou/CoOp lpclip/linear_probe.sh (``--num_step 8``) and linear_probe.py (grid, L-BFGS, max_iter 1000),
#: features from lpclip/feat_extractor.py (test transform, ``clip_model.visual``: not normalised). No gradient
#: steps: the recipe's 0 epochs says so (the fit happens in before_training whatever the epochs).
RECIPE = Recipe(
    train={"epochs": 0},
    source="KaiyangZhou/CoOp lpclip/linear_probe.py, lpclip/linear_probe.sh (--num_step 8), "
    "lpclip/feat_extractor.py (features under build_transform(cfg, is_train=False), not normalised)",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("linear_probe", LinearProbeOptions, LinearProbe,
                        "linear-probe CLIP: logistic regression on frozen image features, C searched on the "
                        "validation split (CoOp's baseline)", RECIPE)]
