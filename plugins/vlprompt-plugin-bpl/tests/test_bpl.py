"""Bayesian prompt learning: the KL, the objective and the prediction rule by hand,
the noise draw, the conditional variant at any batch size, and the method contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import Batch, ClassSet, MethodOutput
from vlprompt_core.testing import Case, MethodContract, tiny_backbone
from vlprompt_core.testing import frozen_features as features
from vlprompt_plugin_bpl import BPL, BPLOptions, gaussian_kl, log_mean_probability

NAMES = ["red", "green", "apple pie", "blue"]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("bpl"))


def build(bb, seed=0, **opts):
    torch.manual_seed(seed)
    return BPL(bb, ClassSet(NAMES), BPLOptions(**opts))


def test_kl_closed_form_on_hand_computed_values():
    # KL(N(mu, s^2) || N(0,1)) = (s^2 + mu^2 - 1 - log s^2) / 2 per dimension, then the mean
    mu = torch.tensor([[0.0, 1.0, -2.0]])
    log_var = torch.tensor([[0.0, math.log(4.0), math.log(0.25)]])
    # dims: (1 + 0 - 1 - 0)/2 = 0; (4 + 1 - 1 - log 4)/2 = 2 - log 2; (0.25 + 4 - 1 - log 0.25)/2 = 1.625 + log 2
    expected = (0.0 + (2 - math.log(2)) + (1.625 + math.log(2))) / 3
    assert gaussian_kl(mu, log_var).item() == pytest.approx(expected, rel=1e-6)
    assert gaussian_kl(mu, log_var).item() == pytest.approx(3.625 / 3, rel=1e-6)
    # and torch's own distributions agree
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, log_var.exp().sqrt()),
                                            torch.distributions.Normal(0.0, 1.0)).mean(-1)
    assert torch.allclose(gaussian_kl(mu, log_var), ref, atol=1e-6)


def test_objective_equals_the_formula_on_a_hand_built_example(bb):
    """L = 2 samples, B = 2 images, C = 2 classes; log p given directly."""
    m = build(bb)
    p = torch.tensor([[[0.9, 0.1], [0.3, 0.7]],    # sample 1: p(y | x_1), p(y | x_2)
                      [[0.5, 0.5], [0.2, 0.8]]])   # sample 2
    labels = torch.tensor([0, 1])
    kl_term = torch.tensor(0.25)
    out = MethodOutput(torch.zeros(2, 2), losses={"kl": kl_term}, extras={"log_p": p.log()})
    loss = m.loss(out, Batch(labels=labels))
    # image 1: log((0.9 + 0.5) / 2) = log 0.7; image 2: log((0.7 + 0.8) / 2) = log 0.75
    expected = -(math.log(0.7) + math.log(0.75)) / 2 + 0.25
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # not the mean of per-sample log-likelihoods (that would be the ELBO's E_q log p)
    elbo_like = -(math.log(0.9) + math.log(0.5) + math.log(0.7) + math.log(0.8)) / 4 + 0.25
    assert loss.item() != pytest.approx(elbo_like, rel=1e-3)


def test_prediction_averages_probabilities_not_logits(bb):
    """Two samples whose mean logits and mean probabilities pick different classes."""
    logits = torch.tensor([[[0.0, 5.0, 0.0]], [[0.0, -5.0, 1.0]]])  # [L=2, B=1, C=3]
    # mean logits [0, 0, 0.5] -> class 2; mean probabilities ~[0.14, 0.49, 0.37] -> class 1
    assert logits.mean(0).argmax(-1).item() == 2
    scores = log_mean_probability(logits.log_softmax(-1))
    assert scores.argmax(-1).item() == 1
    assert torch.allclose(scores.exp(), logits.softmax(-1).mean(0), atol=1e-6)
    # the method's scores are exactly that rule applied to its own samples
    m = build(bb, n_samples=2)
    torch.manual_seed(5)
    out = m(Batch(image_features=features(bb, 3)))
    assert torch.allclose(out.logits, log_mean_probability(out.extras["log_p"]), atol=1e-6)
    assert torch.equal(m.predict(out), out.logits)


def test_noise_is_one_draw_of_L_by_posterior_shape_from_the_default_generator(bb):
    m = build(bb, n_samples=3)
    f = features(bb, 2)
    torch.manual_seed(7)
    out = m(Batch(image_features=f))
    torch.manual_seed(7)
    eps = torch.randn(3, 1, bb.text_width)  # the official draw: (L,) + mu.shape
    after = torch.randn(1)
    torch.manual_seed(7)
    m(Batch(image_features=f))
    assert torch.equal(torch.randn(1), after)  # the forward drew exactly that much
    # and the draw is what the forward used: rebuild the scores from it
    residual = m.mu[None] + eps * m.log_var.exp().sqrt()[None]
    text = m.prompts.encode(bb, (m.ctx + residual[:, :, None])[:, :, None])  # [L, 1, C, D]
    logits = torch.stack([bb.logit_scale * F.normalize(f, dim=-1) @ F.normalize(text[i, 0], dim=-1).T
                          for i in range(3)])
    expected = torch.logsumexp(logits.log_softmax(-1), 0) - math.log(3)
    assert torch.allclose(out.logits, expected, atol=1e-4)
    # the same residual is added to every context vector
    shifted = m.ctx + residual[:, :, None]
    assert torch.allclose(shifted - m.ctx, residual[:, :, None].expand_as(shifted), atol=0)


def test_unconditional_samples_are_shared_by_the_batch(bb):
    """One draw per forward: image i's scores in a batch equal a single-image forward
    given the same draw."""
    m = build(bb, n_samples=4)
    f = features(bb, 3)
    torch.manual_seed(1)
    batched = m(Batch(image_features=f)).logits
    for i in range(3):
        torch.manual_seed(1)
        single = m(Batch(image_features=f[i : i + 1])).logits
        assert torch.allclose(batched[i : i + 1], single, atol=1e-5)


def test_conditional_at_batch_b_equals_b_single_image_forwards_with_the_same_noise(bb):
    m = build(bb, conditional=True, n_samples=3)
    f = features(bb, 5)
    torch.manual_seed(3)
    eps = torch.randn(3, 5, bb.text_width)
    m.draw = lambda shape: eps if shape[1] == 5 else eps[:, i : i + 1]
    labels = torch.tensor([0, 1, 2, 3, 0])
    out = m(Batch(image_features=f))
    loss = m.loss(out, Batch(labels=labels))
    singles, losses = [], []
    for i in range(5):
        o = m(Batch(image_features=f[i : i + 1]))
        singles.append(o.logits)
        losses.append(m.loss(o, Batch(labels=labels[i : i + 1])))
    assert torch.allclose(out.logits, torch.cat(singles), atol=1e-5)
    # the batch objective is the mean of the single-image objectives (KL averaged over images)
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    # per-image residuals differ across images
    mu, lv = m.posterior(f)
    assert mu.shape == lv.shape == (5, bb.text_width) and not torch.allclose(mu[0], mu[1])


def test_parameters_of_both_variants(bb):
    w, e = bb.text_width, bb.embed_dim
    plain = build(bb)
    assert {n: tuple(p.shape) for n, p in plain.named_parameters() if p.requires_grad} == {
        "ctx": (4, w), "mu": (1, w), "log_var": (1, w)}
    assert torch.equal(plain.mu, torch.zeros(1, w)) and (0 <= plain.log_var).all() and (plain.log_var < 1).all()
    cond = build(bb, conditional=True)
    shapes = {n: tuple(p.shape) for n, p in cond.named_parameters() if p.requires_grad}
    h = e // 2
    for net in ("mean_net", "log_var_net"):
        assert shapes[f"{net}.linear1.weight"] == (h, e) and shapes[f"{net}.linear2.weight"] == (h, h)
        assert shapes[f"{net}.linear3.weight"] == (w, h)


def test_kl_term_is_logged_and_weighted(bb):
    m = build(bb, kl_weight=0.5)
    out = m(Batch(image_features=features(bb, 2)))
    assert out.losses["kl"].item() == pytest.approx(0.5 * gaussian_kl(m.mu, m.log_var).item(), rel=1e-6)


class TestBPLContract(MethodContract):
    method = "bpl"
    cases = [Case({"n_samples": 3}), Case({"conditional": True, "n_samples": 2})]
