"""CLIP-Adapter on a tiny random open_clip backbone: the adapter and the residual blend
against hand-computed values, the hand-written classifier, novel classes, the recipe,
option errors, and the method contract."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprompt_core.api import IMAGE_FEATURES, TEXT_FEATURES, BackboneInfo, Batch, ClassSet
from vlprompt_core.errors import UserError
from vlprompt_core.testing import Case, MethodContract, tiny_backbone
from vlprompt_plugin_clip_adapter import (
    RECIPE,
    Adapter,
    ClipAdapter,
    ClipAdapterOptions,
    blend,
    vlprompt_methods,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]
PET = "a photo of a {}, a type of pet."


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("ca"))


def build(bb, dataset_templates=(PET,), names=NAMES, **opts) -> ClipAdapter:
    """CLIP-Adapter on ``names`` of a dataset whose own templates are ``dataset_templates``."""
    torch.manual_seed(0)
    return ClipAdapter(bb, ClassSet(list(names), templates=list(dataset_templates)), ClipAdapterOptions(**opts))


def hand_written(bb, template, names=NAMES):
    with torch.no_grad():
        return F.normalize(bb.encode_text(bb.tokenize([template.format(n) for n in names])).float(), dim=-1)


def features(bb, n=5, seed=0):
    with torch.no_grad():
        return bb.encode_image(torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))


def test_adapter_and_blend_by_hand():
    """D = 4, r = 2: W1 [2, 4], W2 [4, 2]; relu after each layer, no bias."""
    adapter = Adapter(4, 2)
    with torch.no_grad():
        adapter.fc[0].weight.copy_(torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 2.0, 0.0, -1.0]]))
        adapter.fc[2].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -3.0], [0.5, 0.5]]))
    f = torch.tensor([[3.0, 1.0, 1.0, 4.0]])
    # W1 f = [3 - 1, 2 - 4] = [2, -2] -> relu [2, 0]; W2 [2, 0] = [2, -2, 0, 1] -> relu [2, 0, 0, 1]
    assert adapter(f).tolist() == [[2.0, 0.0, 0.0, 1.0]]
    # 0.2 * [2, 0, 0, 1] + 0.8 * [3, 1, 1, 4] = [2.8, 0.8, 0.8, 3.4]
    assert torch.allclose(blend(f, adapter(f), 0.2), torch.tensor([[2.8, 0.8, 0.8, 3.4]]))
    assert [n for n, _ in adapter.named_parameters()] == ["fc.0.weight", "fc.2.weight"]  # the official names


def test_logits_by_hand(bb):
    """logit_scale * cos(0.2 relu(W2 relu(W1 f)) + 0.8 f, w_c), w_c the hand-written prompt's feature."""
    m = build(bb)
    m.eval()
    f = features(bb)
    out = m(Batch(image_features=f))
    w1, w2 = m.adapter.fc[0].weight.detach(), m.adapter.fc[2].weight.detach()
    adapted = torch.clamp(torch.clamp(f @ w1.T, min=0) @ w2.T, min=0)
    mixed = 0.2 * adapted + 0.8 * f
    text = hand_written(bb, PET)
    expected = bb.logit_scale * (mixed / mixed.norm(dim=-1, keepdim=True)) @ text.T
    assert torch.allclose(out.logits, expected, atol=1e-4)
    assert torch.allclose(out.extras[IMAGE_FEATURES], mixed, atol=1e-6)
    assert torch.allclose(out.extras[TEXT_FEATURES], text, atol=1e-6)

    batch = Batch(image_features=f, labels=torch.tensor([0, 1, 2, 3, 0]))
    assert m.loss(out, batch).item() == pytest.approx(F.cross_entropy(expected, batch.labels).item(), rel=1e-4)


def test_ratio_zero_is_zero_shot_clip(bb):
    m = build(bb, ratio=0.0)
    f = features(bb)
    expected = bb.logit_scale * F.normalize(f, dim=-1) @ hand_written(bb, PET).T
    assert torch.allclose(m(Batch(image_features=f)).logits, expected, atol=1e-4)


def test_ratio_one_is_the_adapter_alone(bb):
    m = build(bb, ratio=1.0)
    f = features(bb)
    with torch.no_grad():
        assert torch.equal(m.adapt(f), m.adapter(f))


def test_only_the_adapter_trains(bb):
    m = build(bb)
    trainable = {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"adapter.fc.0.weight": (8, 32), "adapter.fc.2.weight": (32, 8)}  # embed_dim 32, r 4
    assert set(m.state_dict()) == {"adapter.fc.0.weight", "adapter.fc.2.weight"}  # no classifier checkpointed
    assert [n for n, p in build(bb, reduction=32).named_parameters()] == ["adapter.fc.0.weight", "adapter.fc.2.weight"]
    assert build(bb, reduction=32).adapter.fc[0].weight.shape == (1, 32)


def test_classifier_is_the_templates(bb):
    """The dataset's own template (the official CUSTOM_TEMPLATES), or the option's templates, averaged."""
    texture = build(bb, dataset_templates=["{} texture."])
    assert torch.allclose(texture.classifier, hand_written(bb, "{} texture."), atol=1e-6)
    own = build(bb, dataset_templates=["{} texture."], templates=["a photo of a {}, a type of texture."])
    assert torch.allclose(own.classifier, hand_written(bb, "a photo of a {}, a type of texture."), atol=1e-6)
    two = ["a photo of a {}.", "a {}."]
    expected = F.normalize(hand_written(bb, two[0]) + hand_written(bb, two[1]), dim=-1)
    assert torch.allclose(build(bb, templates=two).classifier, expected, atol=1e-6)


def test_novel_classes_keep_the_adapter(bb):
    """Base-to-novel: the adapter is class-agnostic, the classifier comes from the new names."""
    m = build(bb)
    with torch.no_grad():
        for p in m.adapter.parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.set_classes(ClassSet(["purple", "orange"], templates=[PET]))
    m.eval()
    f = features(bb)
    out = m(Batch(image_features=f))
    assert out.logits.shape == (5, 2)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    mixed = m.adapt(f)
    expected = bb.logit_scale * F.normalize(mixed, dim=-1) @ hand_written(bb, PET, ["purple", "orange"]).T
    assert torch.allclose(out.logits, expected, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 48), reduction=st.integers(1, 8), batch=st.integers(1, 6),
       ratio=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_blend_shapes_and_formula(dim, reduction, batch, ratio, seed):
    if dim // reduction < 1:
        return
    torch.manual_seed(seed)
    adapter = Adapter(dim, reduction)
    f = torch.randn(batch, dim)
    w1, w2 = adapter.fc[0].weight.detach(), adapter.fc[2].weight.detach()
    assert w1.shape == (dim // reduction, dim) and w2.shape == (dim, dim // reduction)
    out = adapter(f)
    assert out.shape == (batch, dim) and (out >= 0).all()
    expected = ratio * torch.relu(torch.relu(f @ w1.T) @ w2.T) + (1 - ratio) * f
    assert torch.allclose(blend(f, out, ratio), expected, atol=1e-5)


def test_bad_options_are_one_line():
    for bad in ({"ratio": 1.5}, {"ratio": -0.1}, {"reduction": 0}, {"templates": ["a photo"]}, {"ration": 0.2}):
        with pytest.raises(ValueError):
            ClipAdapterOptions(**bad)
    with pytest.raises(UserError, match=r"method.reduction: 64 leaves no hidden unit .* at most 32") as err:
        ClipAdapter.effective_options(ClipAdapterOptions(reduction=64), BackboneInfo(embed_dim=32))
    assert "\n" not in str(err.value)
    assert ClipAdapter.effective_options(ClipAdapterOptions(reduction=64), BackboneInfo()).options.reduction == 64


def test_too_large_reduction_refused_when_built(bb):
    with pytest.raises(UserError, match="no hidden unit"):
        build(bb, reduction=33)


def test_recipe_is_coops_schedule_with_the_official_constants():
    train, options = RECIPE.for_context({"protocol": "few_shot", "shots": 16, "dataset": "oxford_pets"})
    assert (train["optimizer"], train["lr"], train["batch_size"], train["epochs"]) == ("sgd", 0.002, 32, 200)
    assert (train["warmup_epochs"], train["warmup_lr"], train["weight_decay"]) == (1, 1e-5, 5e-4)
    assert options == {"ratio": 0.2, "reduction": 4}
    assert RECIPE.for_context({"protocol": "few_shot", "shots": 1, "dataset": "dtd"})[0]["epochs"] == 50
    assert RECIPE.for_context({"protocol": "few_shot", "shots": 4, "dataset": "dtd"})[0]["epochs"] == 100
    assert RECIPE.for_context({"protocol": "few_shot", "shots": 16, "dataset": "imagenet"})[0]["epochs"] == 50
    assert "gaopengcuhk/CLIP-Adapter" in RECIPE.source and "KaiyangZhou/CoOp" in RECIPE.source


def test_published_few_shot_numbers():
    entry = vlprompt_methods()[0]
    assert entry.name == "clip_adapter" and entry.trains
    published = {(p.dataset, p.shots): p for p in entry.published}
    assert len(published) == 55 and {p.backbone for p in entry.published} == {"RN50"}
    assert published[("imagenet", 16)].metrics == {"accuracy": 63.59}
    assert published[("fgvc_aircraft", 1)].metrics == {"accuracy": 17.49}


class TestClipAdapterContract(MethodContract):
    method = "clip_adapter"
    cases = [
        Case({}),
        Case({"ratio": 0.5, "reduction": 2, "templates": "ensemble"}),
    ]
