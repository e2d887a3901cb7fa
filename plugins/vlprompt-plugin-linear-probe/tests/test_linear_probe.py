"""The linear probe: the official C search worked by hand, the fit against scikit-learn and a
closed-form optimum, the classes it can score, what it refuses, the checkpoint, and the
method contract."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprompt_core.api import Batch, ClassSet, FrozenFeatures
from vlprompt_core.errors import UserError
from vlprompt_core.testing import Case, MethodContract, synthetic_frozen_data, tiny_backbone
from vlprompt_plugin_linear_probe import (
    FIXED,
    GRID,
    RECIPE,
    LinearProbe,
    LinearProbeOptions,
    fit_logistic,
    linear_head,
    rows_of,
    search_c,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("lp"))


class Given:
    """A FrozenData of given features (train, val), as the engine hands it."""

    def __init__(self, names, train, val):
        self.classes = ClassSet(list(names))
        self._train = FrozenFeatures(torch.as_tensor(train[0], dtype=torch.float32), torch.as_tensor(train[1]))
        self._val = FrozenFeatures(torch.as_tensor(val[0], dtype=torch.float32), torch.as_tensor(val[1]))

    def train(self, views: int = 0):
        assert views == 0, "the official probe fits one centre-cropped view per image"
        return self._train

    def val(self):
        return self._val


def clusters(n_classes=4, per_class=6, dim=8, spread=1.0, seed=0):
    """Gaussian clusters: features [N, dim] (fp32 values) and labels."""
    gen = np.random.default_rng(seed)
    centres = gen.normal(0, 1, (n_classes, dim))
    x = np.concatenate([c + spread * gen.normal(0, 1, (per_class, dim)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(n_classes), per_class)


def fitted(bb, names=NAMES, data=None, **options) -> LinearProbe:
    method = LinearProbe(bb, ClassSet(list(names)), LinearProbeOptions(**options))
    method.eval()
    method.before_training(data or Given(names, clusters(len(names)), clusters(len(names), per_class=3, seed=1)))
    method.after_training(data)
    return method


# ------------------------------------------------------------------ the search


def test_search_worked_by_hand():
    """score(C) = -|log10 C - 0.3|. Grid peak 1 (0.3 away); then the ends kept, by hand:
    [0.1, 10] -> 10; [1, 10] -> 1; [1, 10^.5] -> 10^.5; [10^.25, 10^.5] -> 10^.25;
    [10^.25, 10^.375] -> 10^.25; [10^.25, 10^.3125] -> 10^.3125; [10^.28125, 10^.3125] -> 10^.3125;
    [10^.296875, 10^.3125] -> 10^.296875."""
    chosen, tried = search_c(lambda c: -abs(math.log10(c) - 0.3), steps=8)
    assert [c for c, _ in tried[:7]] == list(GRID)
    ends = [(math.log10(a), math.log10(b)) for (a, _), (b, _) in zip(tried[7::2], tried[8::2])]
    by_hand = [(-1, 1), (0, 1), (0, .5), (.25, .5), (.25, .375), (.25, .3125), (.28125, .3125), (.296875, .3125)]
    assert np.allclose(ends, by_hand, rtol=0, atol=1e-12)
    assert chosen == pytest.approx(10 ** 0.296875, rel=1e-12)


def test_search_ties_go_to_the_weakest_penalty_on_the_grid_and_to_the_left_end_after():
    """Accuracy 1 from C = 2 up, 0 below: the grid's first best is 1e6 (its first entry);
    both ends then tie at every step and the left (smaller C) is kept: 1e5."""
    chosen, tried = search_c(lambda c: float(c >= 2), steps=8)
    assert tried[0] == (1e6, 1.0) and len(tried) == 7 + 2 * 8
    assert chosen == 1e5


def test_no_steps_is_the_grid_best():
    assert search_c(lambda c: -abs(math.log10(c) + 2.2), steps=0)[0] == 1e-2


def test_the_arithmetic_is_the_official_to_the_bit():
    """The ends go through log10 and a power of 10 every step, as linear_probe.py's do:
    e.g. the kept right end 10 becomes np.power(10, np.log10(10.0))."""
    _, tried = search_c(lambda c: float(c > 3), steps=3, grid=(1.0,))
    left, right = 1e-1 * 1.0, 1e1 * 1.0
    expected = [1.0]
    for _ in range(3):
        expected += [left, right]
        at_left, at_right = float(left > 3), float(right > 3)
        if at_left < at_right:
            left, right = np.power(10, 0.5 * (np.log10(right) + np.log10(left))), np.power(10, np.log10(right))
        else:
            left, right = np.power(10, np.log10(left)), np.power(10, 0.5 * (np.log10(right) + np.log10(left)))
    assert [c for c, _ in tried] == expected


# ------------------------------------------------------------------ the fit


def test_fit_is_sklearns_at_the_chosen_c(bb):
    x, y = clusters()
    xv, yv = clusters(per_class=3, seed=1)
    method = fitted(bb, data=Given(NAMES, (x, y), (xv, yv)))
    c = method.C.item()
    assert c == method.search[-2][0] or c == method.search[-1][0]  # an end of the last step
    clf = fit_logistic(x.astype(np.float64), y, c)
    assert torch.equal(method.weight, torch.as_tensor(clf.coef_, dtype=torch.float32))
    assert torch.equal(method.bias, torch.as_tensor(clf.intercept_, dtype=torch.float32))
    xt, _ = clusters(per_class=5, seed=2)
    with torch.no_grad():
        logits = method(Batch(image_features=torch.from_numpy(xt))).logits
    assert np.allclose(logits.numpy(), clf.decision_function(xt.astype(np.float64)), atol=1e-4, rtol=1e-5)
    assert (logits.argmax(-1).numpy() == clf.predict(xt.astype(np.float64))).all()
    # each C scored by the validation images a fit at it classifies right
    for value, right in method.search[:3]:
        assert right == int((fit_logistic(x.astype(np.float64), y, value).predict(xv.astype(np.float64)) == yv).sum())


def test_binary_probe_by_hand(bb):
    """Two points, x = +1 (class 1) and x = -1 (class 0), C = 1: by symmetry b = 0, and w
    minimises w^2 / 2 + 2 log(1 + e^-w), i.e. w (1 + e^w) = 2: w = 0.6749 (to 1e-4, hand
    bisection: 0.675 (1 + e^0.675) = 2.0008, 0.674 (1 + e^0.674) = 1.9981). Scores [0, w x]."""
    data = Given(["no", "yes"], (np.array([[1.0], [-1.0]]), np.array([1, 0])),
                 (np.array([[1.0]]), np.array([1])))
    method = fitted(SimpleNamespace(embed_dim=1), ["no", "yes"], data, C=1.0)
    assert method.weight[0].item() == 0 and method.bias[0].item() == 0
    assert method.weight[1].item() == pytest.approx(0.6749, abs=2e-4)
    assert abs(method.bias[1].item()) < 1e-4
    assert method.C.item() == 1.0 and method.search == []
    logits = method(Batch(image_features=torch.tensor([[2.0]]))).logits
    assert logits[0, 1].item() == pytest.approx(2 * method.weight[1].item(), rel=1e-6)


@settings(max_examples=12, deadline=None)
@given(n_classes=st.integers(2, 5), dim=st.integers(1, 6), per_class=st.integers(1, 4))
def test_head_reproduces_decision_values_for_any_shape(n_classes, dim, per_class):
    x, y = clusters(n_classes, per_class, dim, spread=2.0)
    clf = fit_logistic(x.astype(np.float64), y, 0.5)
    weight, bias = linear_head(clf, n_classes)
    assert weight.shape == (n_classes, dim) and bias.shape == (n_classes,)
    scores = x @ weight.T + bias
    decision = clf.decision_function(x.astype(np.float64))
    if n_classes == 2:
        assert np.allclose(scores[:, 1] - scores[:, 0], decision)
        assert np.allclose(np.exp(scores[:, 1]) / np.exp(scores).sum(1), clf.predict_proba(x)[:, 1])
    else:
        assert np.allclose(scores, decision)
    assert (scores.argmax(1) == clf.predict(x.astype(np.float64))).all()


def test_fit_only_on_the_training_split(bb):
    """The classifier is the train-only fit at the chosen C (validation images choose C, never
    join the fit): refitting on train alone at that C gives the same weights."""
    method = fitted(bb)
    x, y = clusters()
    clf = fit_logistic(x.astype(np.float64), y, method.C.item())
    assert torch.equal(method.weight, torch.as_tensor(clf.coef_, dtype=torch.float32))


def test_given_c_skips_the_search(bb):
    method = fitted(bb, C=0.25)
    assert method.C.item() == 0.25 and method.search == []


# ------------------------------------------------------------------ classes


def test_other_orders_and_subsets_of_the_fitted_classes(bb):
    method = fitted(bb)
    feats = torch.from_numpy(clusters(per_class=2, seed=3)[0])
    with torch.no_grad():
        scores = method(Batch(image_features=feats)).logits
        method.set_classes(ClassSet(["yellow", "red", "blue"]))
        assert torch.equal(method(Batch(image_features=feats)).logits, scores[:, [3, 0, 2]])
        method.set_classes(ClassSet(list(NAMES)))
        assert torch.equal(method(Batch(image_features=feats)).logits, scores)


def test_a_name_two_fitted_classes_share_takes_their_rows_in_order(bb):
    names = ["missile", "tank", "missile", "boat"]  # as ImageNet's 'missile' (labels 657 and 744)
    method = fitted(bb, names)
    feats = torch.from_numpy(clusters(per_class=2, seed=3)[0])
    with torch.no_grad():
        scores = method(Batch(image_features=feats)).logits
        method.set_classes(ClassSet(["boat", "missile"]))  # ImageNet-R holds 657 only, the first
        assert torch.equal(method(Batch(image_features=feats)).logits, scores[:, [3, 0]])
        method.set_classes(ClassSet(["missile", "boat", "missile"]))
        assert torch.equal(method(Batch(image_features=feats)).logits, scores[:, [0, 3, 2]])
    assert rows_of(["a", "a", "a"], ["a", "b", "a"]) == [0, 2, 2]  # more than fitted: the last row again


def test_other_class_names_are_one_line_refusals(bb):
    method = fitted(bb)
    with pytest.raises(UserError) as exc:
        method.set_classes(ClassSet(["red", "purple", "orange", "pink", "cyan"]))
    (line,) = exc.value.problems
    assert "\n" not in line
    assert line.startswith("'purple', 'orange', 'pink' and 1 more are not among the 4 classes it was fitted on: "
                           "a linear probe has weights for those classes only")
    with pytest.raises(UserError, match="^'cyan' is not among the 4 classes"):
        method.set_classes(ClassSet(["red", "cyan"]))
    assert LinearProbe.fixed_classes(LinearProbeOptions()) == FIXED


# ------------------------------------------------------------------ refusals


def test_no_validation_split_and_no_c_is_a_user_error(bb):
    x, y = clusters()
    data = Given(NAMES, (x, y), (np.zeros((0, 8)), np.zeros(0, dtype=np.int64)))
    with pytest.raises(UserError, match="method.C: linear_probe chooses C on the validation split"):
        fitted(bb, data=data)
    assert fitted(bb, data=data, C=1.0).C.item() == 1.0


def test_a_class_without_training_images_is_a_user_error(bb):
    x, y = clusters()
    keep = y != 2
    with pytest.raises(UserError, match="no training image of 'blue'"):
        fitted(bb, data=Given(NAMES, (x[keep], y[keep]), clusters(per_class=1, seed=1)))


@pytest.mark.parametrize("options", [{"C": 0}, {"C": -1.0}, {"search_steps": -1}, {"max_iter": 0}, {"c": 1.0}])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        LinearProbeOptions(**options)


# ------------------------------------------------------------------ state


def test_checkpoint_holds_the_fit_and_restores_it(bb, tmp_path):
    from vlprompt_core.engine import load_checkpoint, save_checkpoint

    method = fitted(bb)
    assert not [n for n, p in method.named_parameters() if p.requires_grad]  # nothing trains by gradient steps
    assert set(method.fitted_tensors()) == {"weight", "bias", "C", "class_names"}
    meta = {"method": "linear_probe", "options": "{}"}
    save_checkpoint(method, tmp_path / "lp.safetensors", meta)
    fresh = LinearProbe(bb, ClassSet(list(NAMES)), LinearProbeOptions())
    load_checkpoint(fresh, tmp_path / "lp.safetensors", meta)
    fresh.eval()
    assert fresh.C.dtype == torch.float64 and fresh.C.item() == method.C.item()
    assert fresh.fitted_names() == NAMES
    feats = torch.from_numpy(clusters(per_class=2, seed=3)[0])
    with torch.no_grad():
        scores = method(Batch(image_features=feats)).logits
        assert torch.equal(fresh(Batch(image_features=feats)).logits, scores)
        # built for other names (a subset), the checkpoint's names decide the rows
        other = LinearProbe(bb, ClassSet(["blue", "red"]), LinearProbeOptions())
        load_checkpoint(other, tmp_path / "lp.safetensors", meta)
        other.eval()
        other.set_classes(ClassSet(["blue", "red"]))
        assert torch.equal(other(Batch(image_features=feats)).logits, scores[:, [2, 0]])


def test_synthetic_frozen_data_fits_the_real_backbone_features(bb):
    """On the tiny backbone's own features, through the data helper the contract uses."""
    data = synthetic_frozen_data(bb, ClassSet(list(NAMES)), per_class=3, val_per_class=2)
    method = fitted(bb, data=data)
    assert method.weight.shape == (4, bb.embed_dim) and len(method.search) == 7 + 16
    x, y = data.train().features.double().numpy(), data.train().labels.numpy()
    clf = fit_logistic(x, y, method.C.item())
    assert torch.equal(method.weight, torch.as_tensor(clf.coef_, dtype=torch.float32))


def test_recipe_fits_without_gradient_steps():
    train, options = RECIPE.for_context({"protocol": "few_shot", "shots": 16, "dataset": "oxford_pets"})
    assert train == {"epochs": 0} and options == {}


class TestLinearProbeContract(MethodContract):
    method = "linear_probe"
    cases = [Case({}, fixed_classes=True), Case({"C": 0.5}, fixed_classes=True)]
