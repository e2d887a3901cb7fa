"""DePT over coop and kgcoop on a tiny random open_clip backbone: its loss and scores by
hand, the head on other class sets, the recipe, and the method contract over both bases."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import BackboneInfo, Batch, ClassSet
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.testing import Case, MethodContract, tiny_backbone
from vlprompt_plugin_dept import RECIPE, DePT

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]
LABELS = torch.tensor([0, 2, 1, 3, 2])


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("dept"))


@pytest.fixture(scope="module")
def entry():
    return build_registry(*make_plugin_manager()).get("method", "dept")


def build(entry, bb, names=NAMES, **options) -> DePT:
    options = entry.effective(entry.options.model_validate(options), BackboneInfo.of(bb)).options
    torch.manual_seed(0)
    method = entry.make(bb, ClassSet(list(names)), options)
    with torch.no_grad():  # away from the initial values, so that every term and scale matters
        for p in [method.base.ctx, *method.text_affine.parameters(), *method.image_affine.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    return method


def images(bb, n=len(LABELS)):
    return bb.encode_image(torch.randn(n, 3, bb.image_size, bb.image_size,
                                       generator=torch.Generator().manual_seed(1))).detach()


def test_the_core_hands_dept_the_wrapped_method_built_from_its_own_plugin(entry, bb):
    m = build(entry, bb, base={"name": "kgcoop", "kg_weight": 3.0})
    assert type(m.base).__name__ == "KgCoOp" and m.base.options.kg_weight == 3.0
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == [
        "base.ctx", "head.bias", "head.weight", "image_affine.scale", "image_affine.shift",
        "text_affine.scale", "text_affine.shift"]
    assert m.head.out_features == len(NAMES) and m.inputs == m.base.inputs


@pytest.mark.parametrize("base", [{"name": "coop", "n_ctx": 2}, {"name": "kgcoop"}])
def test_loss_moves_weight_w_of_the_cross_entropy_to_the_head(entry, bb, base):
    m = build(entry, bb, base=base, head_weight=0.6)
    m.train()
    batch = Batch(image_features=images(bb), labels=LABELS)
    out = m(batch)
    text = m.base.text_features().float()
    image = batch.image_features.float()
    sim = bb.logit_scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    rows = torch.cat([text[LABELS] * m.text_affine.scale + m.text_affine.shift,
                      image * m.image_affine.scale + m.image_affine.shift])
    head = rows @ m.head.weight.t() + m.head.bias
    want = 0.4 * F.cross_entropy(sim, LABELS) + 0.6 * F.cross_entropy(head, torch.cat([LABELS, LABELS]))
    if base["name"] == "kgcoop":
        want = want + out.losses["kg"]
        assert out.losses["kg"] > 0
    assert torch.allclose(out.logits, sim, atol=1e-4)
    assert torch.allclose(m.loss(out, batch), want, atol=1e-5)


def test_scores_fuse_the_head_on_trained_classes_only(entry, bb):
    m = build(entry, bb, base={"name": "coop", "n_ctx": 2})
    m.eval()
    batch = Batch(image_features=images(bb))
    with torch.no_grad():
        sim = m.base(batch).logits
        head = m.head(m.image_affine(batch.image_features.float()))
        assert torch.allclose(m(batch).logits, 0.3 * sim + 0.7 * head, atol=1e-5)
        order = [2, 0, 3, 1]  # the same classes in another order: the head's rows follow
        m.set_classes(ClassSet([NAMES[i] for i in order]))
        assert torch.allclose(m(batch).logits, (0.3 * sim + 0.7 * head)[:, order], atol=1e-4)
        m.set_classes(ClassSet(["cherry", "red"]))  # a class the head never saw: the base's scores
        assert torch.equal(m(batch).logits, m.base(batch).logits)
    alone = build(entry, bb, base={"name": "coop", "n_ctx": 2}, fuse=False).eval()
    with torch.no_grad():
        assert torch.allclose(alone(batch).logits, alone.head(alone.image_affine(batch.image_features.float())))


def test_the_head_trains_at_its_own_learning_rate(entry, bb):
    m = build(entry, bb, base={"name": "kgcoop"})
    groups = m.parameter_groups()
    assert [g.lr_scale for g in groups] == [1.0, 6.5]
    assert {id(p) for p in groups[0].params} == {id(m.base.ctx)}


def test_recipe_is_the_official_config():
    train, options = RECIPE.for_context({"protocol": "base2novel", "shots": 16, "dataset": "dtd"})
    assert (train["lr"], train["batch_size"], train["epochs"], train["optimizer"]) == (0.0035, 4, 10, "sgd")
    assert (train["warmup_epochs"], train["warmup_lr"]) == (1, 1e-5)
    assert options == {"base": {"kgcoop": {"kg_weight": 2.0}}}


class TestDePTContract(MethodContract):
    method = "dept"
    cases = [
        Case({"base": {"name": "coop", "n_ctx": 2}}, id="over-coop"),
        Case({"base": {"name": "kgcoop"}, "head_weight": 0.5}, id="over-kgcoop"),
    ]
