"""KgCoOp on a tiny random open_clip backbone: the knowledge-guided term by hand, the
hand-written prompt it pulls towards, the recipe, and the method contract."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import Batch, ClassSet
from vlprompt_core.testing import Case, MethodContract, tiny_backbone
from vlprompt_plugin_kgcoop import RECIPE, KgCoOp, KgCoOpOptions, knowledge_distance

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]
PET = "a photo of a {}, a type of pet."


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("kg"))


def build(bb, dataset_templates=(PET,), **opts) -> KgCoOp:
    """KgCoOp on NAMES of a dataset whose own templates are ``dataset_templates``."""
    torch.manual_seed(0)
    return KgCoOp(bb, ClassSet(list(NAMES), templates=list(dataset_templates)), KgCoOpOptions(**opts))


def hand_written(bb, template, names=NAMES):
    with torch.no_grad():
        return bb.encode_text(bb.tokenize([template.format(n) for n in names])).float()


def features(bb, n=5, seed=0):
    with torch.no_grad():
        return bb.encode_image(torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))


def test_kg_term_by_hand(bb):
    """8 * (1 - mean over classes of cos(learned feature, hand-written prompt's feature))."""
    m = build(bb, ctx_init="")
    m.train()
    out = m(Batch(image_features=features(bb), labels=torch.tensor([0, 1, 2, 3, 0])))
    with torch.no_grad():
        learned = m.text_features()
    frozen = hand_written(bb, PET)
    cosines = [float(learned[c] @ frozen[c] / (learned[c].norm() * frozen[c].norm())) for c in range(len(NAMES))]
    expected = 8.0 * (1.0 - sum(cosines) / len(cosines))
    assert expected > 0.05  # random context: far from the hand-written prompt
    assert out.losses["kg"].item() == pytest.approx(expected, rel=1e-5)

    batch = Batch(image_features=features(bb), labels=torch.tensor([0, 1, 2, 3, 0]))
    total = m.loss(out, batch).item()
    assert total == pytest.approx(F.cross_entropy(out.logits, batch.labels).item() + expected, rel=1e-5)


def test_squared_distance_is_twice_one_minus_cos(bb):
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    cos = F.cosine_similarity(a, b, dim=-1)
    assert knowledge_distance(a, b).item() == pytest.approx(1 - cos.mean().item(), rel=1e-5)
    assert knowledge_distance(a, b, "squared").item() == pytest.approx(2 * (1 - cos.mean().item()), rel=1e-5)
    assert knowledge_distance(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter

    cos_m, sq_m = build(bb, ctx_init=""), build(bb, ctx_init="", kg_distance="squared", kg_weight=4.0)
    cos_m.train(), sq_m.train()
    f = features(bb)
    assert sq_m(Batch(image_features=f)).losses["kg"].item() == pytest.approx(
        cos_m(Batch(image_features=f)).losses["kg"].item(), rel=1e-5)  # 4 * 2 (1 - cos) = 8 (1 - cos)


def test_kg_term_vanishes_when_the_context_is_the_prompt_words(bb):
    """ctx from "a photo of a" and the prior "a photo of a {}.": the same prompt, no pull;
    with the dataset's pet template the prompts differ, and so do the features."""
    same = build(bb, dataset_templates=["a photo of a {}."])
    same.train()
    assert same(Batch(image_features=features(bb))).losses["kg"].item() == pytest.approx(0.0, abs=1e-5)
    pet = build(bb)
    pet.train()
    assert pet(Batch(image_features=features(bb))).losses["kg"].item() > 1e-3


def test_prior_is_the_datasets_template_or_the_options(bb):
    m = build(bb, dataset_templates=["{} texture."])
    assert torch.allclose(m.prior, F.normalize(hand_written(bb, "{} texture."), dim=-1), atol=1e-6)
    own = build(bb, dataset_templates=["{} texture."], templates=["a photo of a {}, a type of texture."])
    expected = F.normalize(hand_written(bb, "a photo of a {}, a type of texture."), dim=-1)
    assert torch.allclose(own.prior, expected, atol=1e-6)
    assert "prior" not in own.state_dict()  # rebuilt from the class names, never checkpointed


def test_novel_classes_rebuild_prior_and_eval_has_no_kg_term(bb):
    m = build(bb)
    m.set_classes(ClassSet(["purple", "orange"], templates=[PET]))
    assert torch.allclose(m.prior, F.normalize(hand_written(bb, PET, ["purple", "orange"]), dim=-1), atol=1e-6)
    m.eval()
    out = m(Batch(image_features=features(bb)))
    assert out.logits.shape == (5, 2) and out.losses == {}


def test_zero_weight_is_coop(bb):
    m = build(bb, kg_weight=0.0)
    m.train()
    assert m(Batch(image_features=features(bb))).losses == {}


def test_only_ctx_trains(bb):
    m = build(bb)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["ctx"]
    assert m.ctx.shape == (4, bb.text_width)  # "a photo of a": 4 tokens


def test_recipe_is_the_official_config():
    train, options = RECIPE.for_context({"protocol": "base2novel", "shots": 16, "dataset": "oxford_pets"})
    assert (train["lr"], train["batch_size"], train["epochs"], train["optimizer"]) == (0.002, 128, 100, "sgd")
    assert options == {"ctx_init": "a photo of a", "kg_weight": 8.0}
    _, options = RECIPE.for_context({"protocol": "base2novel", "shots": 16, "dataset": "dtd"})
    assert options["templates"] == ["a photo of a {}, a type of texture."]


def test_bad_template_is_refused():
    with pytest.raises(ValueError, match="needs a"):
        KgCoOpOptions(templates=["a photo"])


class TestKgCoOpContract(MethodContract):
    method = "kgcoop"
    cases = [
        Case({}),
        Case({"ctx_init": "", "n_ctx": 2, "kg_distance": "squared", "templates": "ensemble"}),
    ]
