"""ProGrad on a tiny random open_clip backbone: the projection and the distillation term by
hand, the gradient the engine's ``backward`` hook leaves, the template initialisation, the
recipe and the method contract."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import Batch, ClassSet
from vlprompt_core.errors import UserError
from vlprompt_core.testing import Case, MethodContract, tiny_backbone
from vlprompt_plugin_prograd import RECIPE, ProGrad, ProGradOptions, distillation_loss, project_conflict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("pg"))


def build(bb, template="a photo of a {}.", **opts) -> ProGrad:
    torch.manual_seed(0)
    return ProGrad(bb, ClassSet(list(NAMES), templates=[template]), ProGradOptions(**opts))


def features(bb, n=6, seed=0):
    with torch.no_grad():
        return bb.encode_image(torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))


# ----------------------------------------------------------------- by hand


def test_projection_by_hand():
    a = torch.tensor([1.0, 0.0])
    against = torch.tensor([-1.0, 1.0])  # a . b = -1: conflict; u = (-1, 1)/sqrt(2), a . u = -1/sqrt(2)
    assert torch.allclose(project_conflict(a, against), torch.tensor([0.5, 0.5]))
    assert torch.allclose(project_conflict(a, against, 0.5), torch.tensor([0.75, 0.25]))
    assert torch.equal(project_conflict(a, torch.tensor([1.0, 1.0])), a)  # agreeing: untouched
    assert torch.equal(project_conflict(a, torch.tensor([0.0, 3.0])), a)  # orthogonal: untouched
    shaped = project_conflict(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[-1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(shaped, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # tensors flattened: one dot product


def test_distillation_by_hand():
    logits, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    p = [math.exp(t) / (2 + math.e) for t in (0.0, 1.0, 0.0)]
    z = math.log(math.exp(2) + 1 + math.exp(-1))
    expected = -sum(pi * (li - z) for pi, li in zip(p, (2.0, 0.0, -1.0)))
    assert distillation_loss(logits, teacher).item() == pytest.approx(expected, rel=1e-6)
    z2 = math.log(math.exp(1) + 1 + math.exp(-0.5))
    p2 = [math.exp(t / 2) for t in (0.0, 1.0, 0.0)]
    p2 = [x / sum(p2) for x in p2]
    expected2 = -4 * sum(pi * (li / 2 - z2) for pi, li in zip(p2, (2.0, 0.0, -1.0)))
    assert distillation_loss(logits, teacher, 2.0).item() == pytest.approx(expected2, rel=1e-6)


# ------------------------------------------------------------ the gradient


def _step_gradients(m: ProGrad, bb, labels):
    m.train()
    batch = Batch(image_features=features(bb), labels=labels)
    out = m(batch)
    loss = m.loss(out, batch)
    g_ce = torch.autograd.grad(loss, m.ctx, retain_graph=True)[0]
    g_kl = torch.autograd.grad(out.losses["kl"], m.ctx, retain_graph=True)[0]
    m.zero_grad(set_to_none=True)
    m.backward(loss, out, batch)
    return out, loss, g_ce, g_kl, m.ctx.grad.clone()


def test_backward_projects_the_cross_entropy_gradient_when_it_conflicts(bb):
    m = build(bb, n_ctx=8)
    with torch.no_grad():  # the zero-shot teacher's logits: the labels it likes least
        zero_shot = bb.logit_scale * F.normalize(features(bb).float(), dim=-1) @ m.zero_shot.T
    out, loss, g_ce, g_kl, grad = _step_gradients(m, bb, zero_shot.argmin(-1))  # against the teacher
    dot = (g_ce * g_kl).sum()
    assert dot < 0
    unit = g_kl / g_kl.norm()
    expected = g_ce - (g_ce * unit).sum() * unit
    assert torch.allclose(grad, expected, atol=1e-7, rtol=1e-5)
    assert abs((grad * g_kl).sum()) < 1e-6 * g_ce.norm() * g_kl.norm()  # no longer against the teacher
    assert not torch.allclose(grad, g_ce)
    assert loss.item() == pytest.approx(F.cross_entropy(out.logits, zero_shot.argmin(-1)).item())  # CE alone


def test_backward_keeps_an_agreeing_gradient(bb):
    m = build(bb, n_ctx=8)
    with torch.no_grad():  # the labels the zero-shot teacher likes best: both gradients agree
        zero_shot = bb.logit_scale * F.normalize(features(bb).float(), dim=-1) @ m.zero_shot.T
    _, _, g_ce, g_kl, grad = _step_gradients(m, bb, zero_shot.argmax(-1))
    assert (g_ce * g_kl).sum() > 0
    assert torch.equal(grad, g_ce)


def test_half_projection(bb):
    m = build(bb, n_ctx=8, prograd_lambda=0.5)
    with torch.no_grad():
        zero_shot = bb.logit_scale * F.normalize(features(bb).float(), dim=-1) @ m.zero_shot.T
    _, _, g_ce, g_kl, grad = _step_gradients(m, bb, zero_shot.argmin(-1))
    unit = g_kl / g_kl.norm()
    assert torch.allclose(grad, g_ce - 0.5 * (g_ce * unit).sum() * unit, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------ initialisation


def test_template_init_puts_the_words_last_and_zeros_first(bb):
    m = build(bb, n_ctx=6)
    words = bb.tokenize_words("a photo of a")
    assert torch.equal(m.ctx[:2].detach(), torch.zeros(2, bb.text_width))
    assert torch.equal(m.ctx[2:].detach(), bb.embed_tokens(torch.tensor(words)).float())
    assert m.template.pieces[1:] == ("{}", ".")
    with torch.no_grad():  # then the prompt is "<2 zero vectors> a photo of a <class>."
        ref = bb.encode_text(bb.tokenize([f"X X a photo of a {n}." for n in NAMES]))
        zeroed = bb.embed_tokens(bb.tokenize([f"X X a photo of a {n}." for n in NAMES]))
        zeroed[:, 1:3] = 0
        tokens = bb.tokenize([f"X X a photo of a {n}." for n in NAMES])
        ref = bb.encode_text_embeddings(zeroed.float(), tokens)
        assert torch.allclose(m.text_features(), ref, atol=1e-5)


def test_a_word_of_two_tokens_leaves_the_last_tokens_as_words(bb):
    """"a type of pet, a photo of a": 8 words, 9 tokens ("pet" ","); the first 8 tokens are
    learned, "a" stays a word, as the official "X.. a type of pet, a photo of a <class>." lays out."""
    m = build(bb, template="a type of pet, a photo of a {}.", n_ctx=10)
    assert m.template.pieces[1:] == ("a", "{}", ".")
    phrase = bb.tokenize_words("a type of pet, a photo of a")
    assert len(phrase) == 9
    assert torch.equal(m.ctx[2:].detach(), bb.embed_tokens(torch.tensor(phrase[:8])).float())
    ids, slots = m.template.layout(bb, "apple pie")
    ref = bb.tokenize(["X X a type of pet, a photo of a apple pie."])[0]
    assert ids == [bb.sot_id, *[bb.tokenize_words("X")[0]] * 10, *ref[11 : len(ids) - 1].tolist(), bb.eot_id]
    assert ref[11 : len(ids) - 1].tolist() == bb.tokenize_words("a apple pie.")
    assert slots[1:11] == list(range(10))


def test_templates_the_init_cannot_use_are_one_line_errors(bb):
    with pytest.raises(UserError, match="words before"):
        build(bb, template="{} texture.")
    with pytest.raises(UserError, match="1 to n_ctx"):
        build(bb, template="a centered satellite photo of {}.", n_ctx=4)
    m = build(bb, template="{} texture.", init_from_template=False)  # random init needs no words
    assert m.ctx.shape == (16, bb.text_width) and m.ctx.abs().max() > 0


def test_eval_has_no_distillation_and_novel_classes_work(bb):
    m = build(bb)
    m.set_classes(ClassSet(["purple", "orange"], templates=["a photo of a {}."]))
    m.eval()
    out = m(Batch(image_features=features(bb)))
    assert out.logits.shape == (6, 2) and out.losses == {}


def test_recipe_is_the_official_config():
    def resolve(**ctx):
        return RECIPE.for_context(ctx)

    train, options = resolve(protocol="few_shot", shots=16, dataset="imagenet")
    assert (train["epochs"], train["batch_size"], train["lr"]) == (200, 32, 0.002)
    assert options == {"n_ctx": 16, "init_from_template": True, "prograd_lambda": 1.0, "temperature": 1.0}
    assert resolve(protocol="few_shot", shots=1, dataset="imagenet")[0]["epochs"] == 50
    assert resolve(protocol="few_shot", shots=4, dataset="imagenet")[0]["epochs"] == 100
    assert resolve(protocol="base2novel", shots=16, dataset="imagenet")[0]["epochs"] == 100
    _, options = resolve(protocol="few_shot", shots=16, dataset="dtd")
    assert options["prograd_lambda"] == 0.8 and options["templates"] == ["a texture of {}."]
    assert resolve(protocol="few_shot", shots=4, dataset="dtd")[1]["prograd_lambda"] == 1.0
    assert resolve(protocol="base2novel", shots=16, dataset="eurosat")[1]["prograd_lambda"] == 1.0


class TestProGradContract(MethodContract):
    method = "prograd"
    cases = [Case({"n_ctx": 8}), Case({"init_from_template": False, "n_ctx": 2, "templates": "ensemble"})]
