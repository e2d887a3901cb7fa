"""Tip-Adapter and Tip-Adapter-F: the cache, its scores and the alpha/beta search against
hand-computed values on tiny tensors; the fitting hooks on a tiny random open_clip backbone;
classes the cache never saw; the recipes; the method contract for both entries."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vlprompt_core.api import Batch, ClassSet, FrozenData, FrozenFeatures
from vlprompt_core.testing import Case, MethodContract, synthetic_frozen_data, tiny_backbone
from vlprompt_plugin_tip_adapter import (
    TIP_F_RECIPE,
    TIP_RECIPE,
    TipAdapter,
    TipAdapterF,
    TipAdapterOptions,
    cache_keys,
    columns_for,
    decode_names,
    encode_names,
    search,
    search_grid,
)
from vlprompt_plugin_tip_adapter.cache import affinity, cache_scores, one_hot_values, tip_logits

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]
PET = "a photo of a {}, a type of pet."


# ------------------------------------------------------------------ the arithmetic
def test_keys_are_the_normalised_mean_of_the_raw_views():
    views = torch.tensor([[[3.0, 0.0], [0.0, 2.0]], [[1.0, 4.0], [0.0, 6.0]]])  # K=2, N=2, D=2
    keys = cache_keys(views)
    h = 1 / math.sqrt(2)
    assert torch.allclose(keys, torch.tensor([[h, h], [0.0, 1.0]]))  # mean [2, 2] and [0, 4], then unit
    # the mean of the raw views, not of normalised ones (normalising first would give another direction)
    assert not torch.allclose(keys[0], F.normalize(F.normalize(views[:, 0], dim=-1).mean(0), dim=0))
    assert torch.allclose(cache_keys(views[0]), F.normalize(views[0], dim=-1))  # one view [N, D]


def test_cache_scores_and_logits_by_hand():
    aff = torch.tensor([[1.0, 0.0, 0.5]])  # one image, three cached images
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # classes 0, 1, 1
    scores = cache_scores(aff, values, 2.0)
    assert torch.allclose(scores, torch.tensor([[1.0, math.exp(-2.0) + math.exp(-1.0)]]))
    logits = tip_logits(torch.tensor([[0.5, -0.5]]), aff, values, 3.0, 2.0)
    assert torch.allclose(logits, torch.tensor([[0.5 + 3.0, -0.5 + 3 * (math.exp(-2.0) + math.exp(-1.0))]]))
    assert torch.allclose(affinity(torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])),
                          torch.tensor([[0.6, 0.8]]))


def test_search_grid_is_the_official_one():
    grid = search_grid(7, 200)
    assert len(grid) == 200 and grid[0] == 0.1 and grid[1] == pytest.approx(0.1 + 6.9 / 200)
    assert grid[-1] == pytest.approx(0.1 + 199 * 6.9 / 200) and grid[-1] < 7  # the end is not reached
    assert search_grid(3, 20)[:2] == [0.1, 1 * (3 - 0.1) / 20 + 0.1]


def _two_images():
    """Class 0 leads the zero-shot logits of both images by 1; the cache holds one image of
    each class; image 1 is class 1's cached image (affinity 1), so only a large alpha with a
    sharp enough beta turns it: alpha (1 - e^-beta) > 1."""
    clip = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    aff = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    values = torch.eye(2)
    return clip, aff, values


def test_search_finds_the_pair_by_hand():
    clip, aff, values = _two_images()
    # betas 0.1, 0.3; alphas 0.1, 10.1: only (0.3, 10.1) classifies image 1 (10.1 (1 - e^-0.3) = 2.6 > 1,
    # 10.1 (1 - e^-0.1) = 0.96 < 1)
    found = search(clip, aff, values, torch.tensor([0, 1]), (0.5, 20.1), (2, 2))
    assert (found.beta, found.alpha, found.correct, found.total) == (search_grid(0.5, 2)[1], 10.1, 2, 2)


def test_search_keeps_the_first_best_and_gives_zero_when_none_is_right():
    clip, aff, values = _two_images()
    # every pair gets image 0 right and none image 1 (alphas 0.1, 0.2): the first pair stays
    found = search(clip, aff, values, torch.tensor([0, 1]), (0.5, 0.3), (2, 2))
    assert (found.beta, found.alpha, found.correct) == (0.1, 0.1, 1)
    found = search(clip, aff, values, torch.tensor([1, 1]), (0.5, 0.3), (2, 2))  # both wrong everywhere
    assert (found.beta, found.alpha, found.correct) == (0.0, 0.0, 0)  # as the official search_hp
    found = search(clip[:0], aff[:0], values, torch.tensor([], dtype=torch.long), (0.5, 0.3), (2, 2))
    assert found.total == 0


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), c=st.integers(1, 5), d=st.integers(1, 6), b=st.integers(1, 6),
       seed=st.integers(0, 10_000), rows=st.integers(1, 4))
def test_search_is_the_brute_force_argmax(n, c, d, b, seed, rows):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    keys = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    values = F.one_hot(torch.randint(0, c, (n,), generator=g), c).float()
    clip = torch.randn(b, c, generator=g)
    labels = torch.randint(0, c, (b,), generator=g)
    aff = affinity(img, keys)
    found = search(clip, aff, values, labels, (3.0, 2.0), (4, 3), rows=rows)
    best, pick = 0, (0.0, 0.0)
    for beta in search_grid(3.0, 4):
        for alpha in search_grid(2.0, 3):
            logits = torch.stack([clip[i] + alpha * sum(math.exp(-beta * (1 - float(aff[i, j]))) * values[j]
                                                        for j in range(n)) for i in range(b)])
            right = int((logits.argmax(-1) == labels).sum())
            if right > best:
                best, pick = right, (beta, alpha)
    assert (found.beta, found.alpha, found.correct) == (*pick, best)


def test_values_and_columns_by_name():
    cols = columns_for(["a", "b", "c"], ["c", "x", "a"])
    assert cols.tolist() == [2, -1, 0]
    values = one_hot_values(torch.tensor([0, 1, 2, 2]), cols, 3)
    assert values.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0], [1, 0, 0]]
    # a repeated name (ImageNet's two 'missile' classes): the k-th of the cache is the k-th of the classes
    assert columns_for(["m", "z", "m"], ["m", "m", "z"]).tolist() == [0, 2, 1]
    assert decode_names(encode_names(["é", "a b", '"q"'])) == ["é", "a b", '"q"']
    assert decode_names(encode_names([])) == []


# ------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tip"))


def classes(names=NAMES):
    return ClassSet(list(names), templates=[PET])


def build(bb, cls=TipAdapter, names=NAMES, **opts) -> TipAdapter:
    torch.manual_seed(0)
    return cls(bb, classes(names), TipAdapterOptions(**opts))


class Features(FrozenData):
    """Hand-made frozen features: ``views`` ``[K, N, D]`` raw, ``val`` ``[M, D]``."""

    def __init__(self, names, views, labels, val, val_labels):
        self.classes = classes(names)
        self.views, self.labels, self.val_f, self.val_labels = views, labels, val, val_labels
        self.asked: list[int] = []

    def train(self, views: int = 0) -> FrozenFeatures:
        self.asked.append(views)
        return FrozenFeatures(self.views[:views] if views else self.views[0], self.labels)

    def val(self) -> FrozenFeatures:
        return FrozenFeatures(self.val_f, self.val_labels)


def hand_data(bb, names=NAMES, k=3, per_class=2, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = per_class * len(names)
    return Features(names, 3.0 * torch.randn(k, n, bb.embed_dim, generator=g),
                    torch.arange(len(names)).repeat_interleave(per_class),
                    torch.randn(m, bb.embed_dim, generator=g), torch.randint(0, len(names), (m,), generator=g))


def zero_shot(bb, feats, names=NAMES, templates=(PET,)):
    text = torch.stack([F.normalize(bb.encode_text(bb.tokenize([t.format(n) for n in names])).float(), dim=-1)
                        for t in templates]).mean(0)
    return 100.0 * F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).T


def test_before_training_builds_the_cache_from_k_views(bb):
    m = build(bb, augment_epoch=3, init_alpha=2.5, init_beta=4.0).eval()
    data = hand_data(bb)
    m.before_training(data)
    assert data.asked == [3]
    assert torch.allclose(m.cache_keys, F.normalize(data.views.mean(0), dim=-1))
    assert m.cache_labels.tolist() == data.labels.tolist()
    assert decode_names(m.cache_classes) == NAMES
    assert (m.alpha.item(), m.beta.item()) == (2.5, 4.0)
    assert torch.equal(m.values(), F.one_hot(data.labels, len(NAMES)).float())


def test_logits_by_hand(bb):
    m = build(bb, augment_epoch=2, init_alpha=3.0, init_beta=5.5, search=False).eval()
    data = hand_data(bb, k=2)
    m.before_training(data)
    m.after_training(data)  # search off: the initial values stay
    feats = torch.randn(4, bb.embed_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = m(Batch(image_features=feats)).logits
    keys = F.normalize(data.views.mean(0), dim=-1)
    f = F.normalize(feats, dim=-1)
    expected = zero_shot(bb, feats).clone()
    for i in range(4):
        for j in range(len(data.labels)):
            expected[i, data.labels[j]] += 3.0 * math.exp(-5.5 * (1 - float(f[i] @ keys[j])))
    assert torch.allclose(got, expected, atol=1e-4)


def test_after_training_searches_on_the_validation_features(bb):
    m = build(bb, augment_epoch=2, search_scale=(9.0, 4.0), search_step=(30, 10)).eval()
    data = hand_data(bb, k=2, m=12, seed=1)
    data.val_f = data.views.mean(0)[[0, 3, 5, 6, 2]] + 0.3 * torch.randn(5, bb.embed_dim)  # near cached images
    data.val_labels = data.labels[[0, 3, 5, 6, 2]]
    m.before_training(data)
    m.after_training(data)
    f = F.normalize(data.val_f, dim=-1)
    expected = search(zero_shot(bb, data.val_f), affinity(f, m.cache_keys), m.values(), data.val_labels,
                      (9.0, 4.0), (30, 10))
    assert (m.beta.item(), m.alpha.item()) == (expected.beta, expected.alpha)
    assert expected.beta in search_grid(9.0, 30) and expected.alpha in search_grid(4.0, 10)


def test_an_empty_validation_split_keeps_the_initial_values(bb):
    m = build(bb, augment_epoch=2, init_alpha=1.5, init_beta=2.0).eval()
    data = hand_data(bb, k=2)
    data.val_f, data.val_labels = torch.zeros(0, bb.embed_dim), torch.zeros(0, dtype=torch.long)
    m.before_training(data)
    m.after_training(data)
    assert (m.alpha.item(), m.beta.item()) == (1.5, 2.0)


def test_novel_classes_are_scored_by_zero_shot_clip_alone(bb):
    m = build(bb, augment_epoch=2).eval()
    data = hand_data(bb, k=2)
    m.before_training(data)
    m.after_training(data)
    feats = torch.randn(3, bb.embed_dim, generator=torch.Generator().manual_seed(5))
    novel = ["purple", "orange", "sea turtle"]
    m.set_classes(classes(novel))
    with torch.no_grad():
        got = m(Batch(image_features=feats)).logits
    assert torch.allclose(got, zero_shot(bb, feats, novel), atol=1e-4)  # the cache has no vote for them
    # base and novel together: the cache votes for the base class it knows, by name, wherever it stands
    m.set_classes(classes(["purple", "apple pie"]))
    with torch.no_grad():
        mixed = m(Batch(image_features=feats)).logits
    zs = zero_shot(bb, feats, ["purple", "apple pie"])
    assert torch.allclose(mixed[:, 0], zs[:, 0], atol=1e-4)
    assert (mixed[:, 1] - zs[:, 1]).min() > 0
    m.set_classes(classes(NAMES))  # back to the training classes: the cache as fitted
    assert torch.equal(m.values(), F.one_hot(data.labels, len(NAMES)).float())


def test_the_cache_keeps_its_class_names_through_a_checkpoint(bb, tmp_path):
    from vlprompt_core.engine import load_checkpoint, save_checkpoint

    m = build(bb, augment_epoch=2).eval()
    data = hand_data(bb, k=2)
    m.before_training(data)
    m.after_training(data)
    save_checkpoint(m, tmp_path / "c.safetensors", {"method": "tip_adapter"})
    other = ["blue", "purple", "red"]  # built for other classes (as an exported classifier may be)
    fresh = build(bb, names=other).eval()
    load_checkpoint(fresh, tmp_path / "c.safetensors", {"method": "tip_adapter"})
    m.set_classes(classes(other))
    feats = torch.randn(3, bb.embed_dim, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(fresh(Batch(image_features=feats)).logits, m(Batch(image_features=feats)).logits)
    assert fresh.values()[:, 1].sum() == 0 and fresh.values()[:, 0].sum() == 2  # blue, then nothing for purple


def test_tip_adapter_f_trains_the_keys_with_the_initial_alpha_beta(bb):
    m = build(bb, TipAdapterF, augment_epoch=2, init_alpha=2.0, init_beta=3.0).eval()
    data = hand_data(bb, k=2)
    m.before_training(data)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert list(trainable) == ["cache_keys"] and trainable["cache_keys"].shape == (8, bb.embed_dim)
    tip = build(bb, augment_epoch=2, init_alpha=2.0, init_beta=3.0).eval()
    tip.before_training(data)
    assert torch.equal(m.cache_keys.detach(), tip.cache_keys)  # initialised with Tip-Adapter's cache
    m.alpha.fill_(7.0)  # a searched value; training must not use it
    m.train()
    feats = torch.randn(4, bb.embed_dim, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 2, 3])
    batch = Batch(image_features=feats, labels=labels)
    out = m(batch)
    assert torch.allclose(out.logits, tip.scores(feats, 2.0, 3.0), atol=1e-5)
    m.loss(out, batch).backward()
    assert m.cache_keys.grad is not None and m.cache_keys.grad.abs().sum() > 0
    # the gradient by hand: d CE / d K through A = f K^T, unnormalised keys (no re-normalisation)
    keys = m.cache_keys.detach().clone().requires_grad_(True)
    f = F.normalize(feats, dim=-1)
    logits = zero_shot(bb, feats) + 2.0 * (-3.0 * (1 - f @ keys.T)).exp() @ m.values()
    F.cross_entropy(logits, labels).backward()
    assert torch.allclose(m.cache_keys.grad, keys.grad, atol=1e-5)


def test_tip_adapter_f_without_steps_is_tip_adapter(bb):
    data = hand_data(bb, k=2, m=8, seed=2)
    f_, tip = (build(bb, cls, augment_epoch=2, search_step=(20, 10)).eval() for cls in (TipAdapterF, TipAdapter))
    for m in (f_, tip):
        m.before_training(data)
        m.after_training(data)
    feats = torch.randn(3, bb.embed_dim)
    with torch.no_grad():
        assert torch.equal(f_(Batch(image_features=feats)).logits, tip(Batch(image_features=feats)).logits)


def test_fitting_on_synthetic_data_from_the_engine_helpers(bb):
    m = build(bb, augment_epoch=2, search_step=(10, 5)).eval()
    data = synthetic_frozen_data(bb, classes(), per_class=3, val_per_class=2)
    m.before_training(data)
    m.after_training(data)
    assert m.cache_keys.shape == (12, bb.embed_dim)
    assert torch.allclose(m.cache_keys.norm(dim=-1), torch.ones(12))
    assert m.beta.item() in [0.0, *search_grid(7.0, 10)] and m.alpha.item() in [0.0, *search_grid(3.0, 5)]


# ------------------------------------------------------------------ options and recipes
def test_options_refuse_bad_values_in_one_line():
    for bad in ({"search_scale": (0, 3)}, {"search_step": (0, 20)}, {"augment_epoch": 0}, {"init_beta": -1},
                {"templates": ["no slot"]}, {"search_scale": (float("nan"), 3)}):
        with pytest.raises(ValidationError) as exc:
            TipAdapterOptions(**bad)
        assert exc.value.error_count() == 1


def test_recipes_are_the_official_configs():
    train, options = TIP_F_RECIPE.for_context({"protocol": "few_shot", "shots": 16, "dataset": "imagenet"})
    assert (train["optimizer"], train["lr"], train["adam_eps"], train["weight_decay"]) == ("adamw", 0.001, 1e-4, 0.01)
    assert (train["batch_size"], train["epochs"], train["warmup_epochs"]) == (256, 20, 0)
    assert (train["schedule"], train["schedule_per"], tuple(train["crop_scale"])) == ("cosine", "step", (0.5, 1.0))
    assert options == {"augment_epoch": 10, "init_beta": 1.0, "search_step": [200, 20], "search_scale": [7, 3],
                       "init_alpha": 1.17, "templates": "ensemble"}
    train, options = TIP_F_RECIPE.for_context({"protocol": "few_shot", "shots": 4, "dataset": "eurosat"})
    assert train["epochs"] == 100 and options["search_scale"] == [12, 10] and options["init_alpha"] == 2
    assert "templates" not in options  # the dataset's own template
    train, options = TIP_RECIPE.for_context({"protocol": "base2novel", "shots": 16, "dataset": "oxford_flowers"})
    assert train["epochs"] == 0 and tuple(train["crop_scale"]) == (0.5, 1.0)
    assert options["search_scale"] == [50, 50] and options["init_alpha"] == 10


def test_published_numbers_are_few_shot_rn50():
    from vlprompt_plugin_tip_adapter import vlprompt_methods

    tip, tip_f = vlprompt_methods()
    assert (tip.name, tip_f.name) == ("tip_adapter", "tip_adapter_f")
    cell = {(p.dataset, p.shots): p.metrics["accuracy"] for p in tip_f.published}
    assert cell[("imagenet", 16)] == 65.51 and cell[("fgvc_aircraft", 1)] == 20.22
    assert {p.backbone for p in tip.published} == {"RN50"} and len(tip.published) == 55


# ------------------------------------------------------------------ the contract
class TestTipAdapterContract(MethodContract):
    method = "tip_adapter"
    cases = [Case({"augment_epoch": 1, "search": False, "templates": "ensemble"})]

    def test_base_to_novel_novel_classes_score_as_zero_shot_clip(self, contract_world, contract_registry,
                                                                 tmp_path):
        """Through the engine: the cache holds base classes only, so on the novel classes
        Tip-Adapter's accuracy is zero-shot CLIP's, to the image (same prompts, same scale)."""
        from vlprompt_core.engine import Engine
        from vlprompt_core.spec import check_spec, validate_spec

        data = {
            "backbone": {"name": "open_clip", "model": str(contract_world["config"]), "pretrained": None},
            "method": [{"name": "tip_adapter", "augment_epoch": 2, "search_step": [20, 10]}, {"name": "zeroshot"}],
            "dataset": {"name": "toy5", "root": str(contract_world["data"])},
            "protocol": {"name": "base2novel", "shots": 2},
            "train": {"seeds": [1], "device": "cpu", "precision": "fp32"},
            "output": str(tmp_path / "out"),
        }
        spec = validate_spec(data, contract_registry)
        check_spec(spec, contract_registry)
        record = Engine(spec, contract_registry).run()
        acc = {r["method"]: r["accuracy"] for r in record["runs"]}
        assert set(acc) == {"tip_adapter", "zeroshot"} and record["status"] == "complete"
        assert acc["tip_adapter"]["novel"] == acc["zeroshot"]["novel"]


class TestTipAdapterFContract(MethodContract):
    method = "tip_adapter_f"
    cases = [Case({"augment_epoch": 2, "search_step": [20, 10]})]
