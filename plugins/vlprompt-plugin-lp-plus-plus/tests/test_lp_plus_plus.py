"""LP++ on a tiny random open_clip backbone: each piece of the fit against hand-computed
values on tiny tensors (step sizes, initial prototypes, bias and blending weights, the
first iterations with momentum and the summed alpha gradient, the validation choice), the
scores, scoring by class name (fixed classes), the recipe, and the method contract."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprompt_core.api import Batch, ClassSet, FrozenFeatures
from vlprompt_core.errors import UserError
from vlprompt_core.testing import Case, MethodContract, synthetic_frozen_data, tiny_backbone
from vlprompt_plugin_lp_plus_plus import (
    RECIPE,
    LPPlusPlus,
    LPPlusPlusOptions,
    fit_lp_plus_plus,
    initial_alpha,
    initial_bias,
    initial_prototypes,
    step_sizes,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie"]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("lpp"))


def unit(x):
    return F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


def problem(n_per_class=3, n_classes=3, dim=4, seed=0, spread=1.0):
    """Unit features around a random direction per class, unit text embeddings, labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    feats = unit(centres[labels] + spread * torch.randn(len(labels), dim, generator=g))
    text = unit(centres + 0.5 * torch.randn(n_classes, dim, generator=g))
    return feats, labels, text


# ------------------------------------------------------------------ the pieces, by hand


def test_step_sizes_by_hand():
    """lr_w = 4 N / lambda_max(F^T F); lr_alpha = N / (4 max_c sum_i <f_i, t_c>^2)."""
    f = unit([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # F^T F = [[1.36, 0.48], [0.48, 1.64]]: eigenvalues 1.5 +- sqrt(0.14^2 + 0.48^2) = 1.5 +- 0.5
    text = unit([[1.0, 0.0], [0.0, 1.0]])
    lr_w, lr_alpha = step_sizes(f, f @ text.T)
    assert lr_w == pytest.approx(4 * 3 / 2.0, rel=1e-6)
    # column sums of squares: 1 + 0.36 + 0 = 1.36 and 0 + 0.64 + 1 = 1.64
    assert lr_alpha == pytest.approx(3 / (4 * 1.64), rel=1e-6)


def test_initial_alpha_by_hand():
    """250 x the mean over classes of the mean text logit of each class's own images."""
    text_logits = torch.tensor([[0.2, 0.9], [0.4, 0.1], [0.7, 0.3], [0.5, 0.6]])
    labels = torch.tensor([0, 0, 1, 1])
    own = [(0.2 + 0.4) / 2, (0.3 + 0.6) / 2]  # class 0 reads column 0, class 1 column 1
    assert initial_alpha(text_logits, labels, 2) == pytest.approx(250 * sum(own) / 2, rel=1e-6)
    # a class without images is left out of the mean
    three = torch.cat([text_logits, torch.full((4, 1), 0.8)], dim=1)[:2]  # a third class, no images
    assert initial_alpha(three, labels[:2], 3) == pytest.approx(250 * own[0], rel=1e-6)


def test_initial_prototypes_are_class_sums():
    f, y, _ = problem(n_per_class=2)
    w = initial_prototypes(f, y, 3)
    for c in range(3):
        assert torch.allclose(w[c], f[y == c].sum(0), atol=1e-6)  # sums, not means (the official code)


def test_initial_bias_is_what_nn_linear_draws():
    torch.manual_seed(7)
    expected = torch.nn.Linear(5, 3).bias.detach()
    torch.manual_seed(7)
    got = initial_bias(5, 3)
    assert torch.equal(got, expected) and got.abs().max() <= 1 / math.sqrt(5)


def manual_iterations(f, y, text, steps, alpha_every, seed):
    """LP++ by hand: softmax gradients, SGD momentum 0.9, alpha's summed gradient."""
    n, c = len(y), text.shape[0]
    onehot = F.one_hot(y, c).float()
    tl = f @ text.T
    lr_w, lr_a = step_sizes(f, tl)
    w = initial_prototypes(f, y, c)
    torch.manual_seed(seed)
    b = initial_bias(f.shape[1], c)
    a = torch.full((c,), initial_alpha(tl, y, c))
    buf_w = buf_b = None
    summed = torch.zeros(c)
    for t in range(steps):
        residual = (torch.softmax(f @ w.T + b + a * tl, dim=1) - onehot) / n  # d(mean CE)/d(logits)
        g_w, g_b, g_a = residual.T @ f, residual.sum(0), (residual * tl).sum(0)
        buf_w = g_w if buf_w is None else 0.9 * buf_w + g_w
        buf_b = g_b if buf_b is None else 0.9 * buf_b + g_b
        w, b = w - lr_w * buf_w, b - lr_w * buf_b
        summed = summed + g_a  # never zeroed
        if (t + 1) % alpha_every == 0:
            a = a - lr_a * summed
    return w, b, a


@pytest.mark.parametrize("steps,alpha_every", [(1, 10), (2, 1), (4, 2), (7, 3)])
def test_iterations_by_hand(steps, alpha_every):
    """Momentum for w and b; alpha steps every alpha_every iterations along the gradient
    summed over *every* iteration so far."""
    f, y, text = problem(seed=steps)
    torch.manual_seed(3)
    fit = fit_lp_plus_plus(f, y, text, iterations=steps, alpha_every=alpha_every)
    w, b, a = manual_iterations(f, y, text, steps, alpha_every, seed=3)
    assert fit.iteration == steps - 1 and fit.val_correct is None
    assert torch.allclose(fit.weight, w, atol=2e-5)
    assert torch.allclose(fit.bias, b, atol=2e-5)
    assert torch.allclose(fit.alpha, a, atol=2e-4 * max(1.0, a.abs().max().item()))
    if steps < alpha_every:
        assert torch.equal(fit.alpha, torch.full_like(fit.alpha, fit.alpha_init))


def test_summed_alpha_gradient_differs_from_a_fresh_one():
    """Two alpha steps: the second one uses g_0 + g_1 (what the official code does), not g_1."""
    f, y, text = problem(seed=5)
    torch.manual_seed(0)
    fit = fit_lp_plus_plus(f, y, text, iterations=2, alpha_every=1)
    w, b, a = manual_iterations(f, y, text, 2, 1, seed=0)
    assert torch.allclose(fit.alpha, a, atol=1e-4)


def test_validation_keeps_the_last_best_iterate():
    """The iterate kept is the last one with the most correct validation predictions."""
    f, y, text = problem(n_per_class=4, spread=2.0, seed=11)
    vf, vy, _ = problem(n_per_class=3, spread=2.0, seed=12)
    counts = []
    for k in range(1, 26):  # iterate k-1 of the same (deterministic) run
        torch.manual_seed(0)
        last = fit_lp_plus_plus(f, y, text, iterations=k)
        logits = vf @ last.weight.T + last.bias + last.alpha * (vf @ text.T)
        counts.append(int((logits.argmax(1) == vy).sum()))
    torch.manual_seed(0)
    kept = fit_lp_plus_plus(f, y, text, vf, vy, iterations=25)
    best = max(counts)
    assert kept.val_correct == best
    assert kept.iteration == max(i for i, c in enumerate(counts) if c == best)
    torch.manual_seed(0)
    same = fit_lp_plus_plus(f, y, text, iterations=kept.iteration + 1)
    assert torch.allclose(kept.weight, same.weight, atol=1e-6) and torch.allclose(kept.alpha, same.alpha, atol=1e-5)


def test_empty_validation_keeps_the_last_iterate():
    f, y, text = problem()
    torch.manual_seed(0)
    fit = fit_lp_plus_plus(f, y, text, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), iterations=5)
    assert fit.iteration == 4 and fit.val_correct is None


@settings(max_examples=25, deadline=None)
@given(n_classes=st.integers(2, 6), per_class=st.integers(1, 5), dim=st.integers(2, 9), seed=st.integers(0, 99))
def test_fit_shapes_and_step_sizes_for_any_shape(n_classes, per_class, dim, seed):
    f, y, text = problem(per_class, n_classes, dim, seed)
    lr_w, lr_a = step_sizes(f, f @ text.T)
    top = torch.linalg.eigvalsh((f.T @ f).double()).max().item()
    assert lr_w == pytest.approx(4 * len(y) / top, rel=1e-9)
    # unit features: lambda_max <= trace = N, so lr_w >= 4
    assert lr_w >= 4 - 1e-4 and lr_a > 0
    torch.manual_seed(seed)
    fit = fit_lp_plus_plus(f, y, text, f, y, iterations=3)
    assert fit.weight.shape == (n_classes, dim) and fit.bias.shape == fit.alpha.shape == (n_classes,)
    assert all(torch.isfinite(t).all() for t in (fit.weight, fit.bias, fit.alpha))
    assert 0 <= fit.iteration < 3 and 0 <= fit.val_correct <= len(y)


# ------------------------------------------------------------------ the method


def build(bb, names=NAMES, **opts) -> LPPlusPlus:
    torch.manual_seed(0)
    return LPPlusPlus(bb, ClassSet(list(names)), LPPlusPlusOptions(**opts))


def features(bb, n=5, seed=0):
    with torch.no_grad():
        return bb.encode_image(torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))


def fitted(bb, names=NAMES, **opts) -> LPPlusPlus:
    opts.setdefault("iterations", 30)
    m = build(bb, names, **opts)
    m.eval()
    torch.manual_seed(1)
    m.before_training(synthetic_frozen_data(bb, ClassSet(list(names)), per_class=3, val_per_class=2))
    return m


def test_scores_by_hand(bb):
    """logit_c = <f/|f|, w_c> + b_c + alpha_c cos(f, t_c)."""
    m = fitted(bb)
    f = features(bb)
    logits = m(Batch(image_features=f)).logits
    u = F.normalize(f, dim=-1)
    t = F.normalize(m.text, dim=-1)
    for i in range(len(f)):
        for c in range(len(NAMES)):
            expected = float(u[i] @ m.weight[c] + m.bias[c] + m.alpha[c] * (u[i] @ t[c]))
            assert logits[i, c].item() == pytest.approx(expected, abs=1e-4)


def test_before_fitting_it_scores_cosines_with_the_text_embeddings(bb):
    m = build(bb)
    m.eval()
    f = features(bb)
    hand = F.normalize(f, dim=-1) @ F.normalize(m.text, dim=-1).T
    assert torch.allclose(m(Batch(image_features=f)).logits, hand, atol=1e-5)


class Recording:
    """A FrozenData that records which views were asked for."""

    def __init__(self, inner):
        self.inner, self.classes, self.asked, self.val_asked = inner, inner.classes, [], 0

    def train(self, views=0):
        self.asked.append(views)
        return self.inner.train(views)

    def val(self):
        self.val_asked += 1
        return self.inner.val()


@pytest.mark.parametrize("augment,views", [(True, 1), (False, 0)])
def test_fits_one_augmented_view_or_the_centre_crop(bb, augment, views):
    m = build(bb, augment=augment, iterations=4)
    data = Recording(synthetic_frozen_data(bb, ClassSet(list(NAMES))))
    m.before_training(data)
    assert data.asked == [views] and data.val_asked == 1
    train = data.inner.train(views)
    feats = train.features[0] if views else train.features
    expected = initial_prototypes(F.normalize(feats, dim=-1), train.labels, 3)
    assert m.last_fit.iteration <= 3 and not torch.equal(m.weight, expected)  # it moved from the class sums

    last = build(bb, select="last", iterations=4)
    data = Recording(synthetic_frozen_data(bb, ClassSet(list(NAMES))))
    last.before_training(data)
    assert data.val_asked == 0 and last.last_fit.iteration == 3


def test_the_text_embeddings_are_the_chosen_templates(bb):
    m = fitted(bb, templates=["a photo of a {}, a type of pet."], iterations=3)
    with torch.no_grad():
        hand = bb.encode_text(bb.tokenize([f"a photo of a {n}, a type of pet." for n in NAMES])).float()
    assert torch.allclose(m.text, F.normalize(hand, dim=-1), atol=1e-6)
    assert m.last_fit.alpha_init == pytest.approx(
        initial_alpha(F.normalize(synthetic_frozen_data(bb, ClassSet(list(NAMES)), per_class=3).train(1).features[0],
                                  dim=-1) @ m.text.T, torch.arange(3).repeat_interleave(3), 3), rel=1e-5)


def test_scores_fitted_classes_by_name_in_any_order_or_subset(bb):
    m = fitted(bb, iterations=5)
    f = features(bb)
    full = m(Batch(image_features=f)).logits
    m.set_classes(ClassSet(["apple pie", "red"]))
    assert torch.allclose(m(Batch(image_features=f)).logits, full[:, [2, 0]], atol=1e-6)
    with pytest.raises(UserError) as exc:
        m.set_classes(ClassSet(["red", "purple", "orange"]))
    (line,) = exc.value.problems
    assert "'purple', 'orange' (2 of 3)" in line and "\n" not in line
    assert m(Batch(image_features=f)).logits.shape == (5, 2)  # a refused set_classes changes nothing


def test_a_repeated_name_keeps_its_rows(bb):
    names = ["red", "missile", "blue", "missile"]
    m = fitted(bb, names, iterations=5)
    f = features(bb)
    full = m(Batch(image_features=f)).logits
    m.set_classes(ClassSet(["missile", "missile", "red"]))
    assert torch.allclose(m(Batch(image_features=f)).logits, full[:, [1, 3, 0]], atol=1e-6)


def test_a_checkpoint_scores_its_classes_by_name(bb, tmp_path):
    """The fitted names travel in the checkpoint: loaded into a method built for the same
    classes in another order, every class keeps its own row."""
    from vlprompt_core.engine import load_checkpoint, save_checkpoint

    m = fitted(bb, iterations=5)
    assert json.loads(bytes(m.class_names.tolist()).decode()) == NAMES
    assert set(m.fitted_tensors()) == {"weight", "bias", "alpha", "text", "class_names"}
    assert not [n for n, p in m.named_parameters() if p.requires_grad]
    meta = {"method": "lp_plus_plus", "options": "{}"}
    save_checkpoint(m, tmp_path / "c.safetensors", meta)
    order = ["apple pie", "red", "green"]
    other = build(bb, order)
    load_checkpoint(other, tmp_path / "c.safetensors", meta)
    other.set_classes(ClassSet(order))
    m.eval(), other.eval()
    f = features(bb)
    assert torch.equal(other(Batch(image_features=f)).logits, m(Batch(image_features=f)).logits[:, [2, 0, 1]])


def test_options_are_checked():
    from pydantic import ValidationError

    for bad in ({"iterations": 0}, {"alpha_every": 0}, {"select": "best"}, {"templates": ["no slot"]}):
        with pytest.raises(ValidationError):
            LPPlusPlusOptions(**bad)


def test_recipe_is_the_official_setting():
    train, options = RECIPE.for_context({"protocol": "few_shot", "shots": 16, "dataset": "oxford_pets"})
    assert train == {"epochs": 0, "crop_scale": [0.5, 1.0]}
    assert options == {"iterations": 300, "alpha_every": 10, "select": "val", "augment": True}
    _, options = RECIPE.for_context({"protocol": "few_shot", "shots": 1, "dataset": "imagenet"})
    assert options["templates"] == "ensemble"


def test_features_fed_to_the_fit_are_unit_vectors(bb):
    """The fit sees L2-normalised features (the official code normalises every feature)."""
    data = synthetic_frozen_data(bb, ClassSet(list(NAMES)))
    scaled = Recording(data)
    scaled.train = lambda views=0: FrozenFeatures(7.0 * data.train(views).features, data.train(views).labels)
    a, b = build(bb, iterations=6), build(bb, iterations=6)
    torch.manual_seed(0)
    a.before_training(data)
    torch.manual_seed(0)
    b.before_training(scaled)
    assert torch.allclose(a.weight, b.weight, atol=1e-5) and torch.allclose(a.alpha, b.alpha, atol=1e-4)


class TestLPPlusPlusContract(MethodContract):
    method = "lp_plus_plus"
    cases = [  # 40 iterations, not the official 300: the battery fits many times; nothing else differs
        Case({"iterations": 40}, fixed_classes=True),
        Case({"select": "last", "augment": False, "iterations": 20, "alpha_every": 3, "templates": "ensemble"},
             fixed_classes=True),
    ]
