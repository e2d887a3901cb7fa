"""TCP on a tiny random open_clip backbone: the class-aware tokens at the context slots of
one inner text block, checked against a hand-run text tower; the loss; the recipe; the
method contract."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import BackboneInfo, Batch, ClassSet
from vlprompt_core.testing import Case, MethodContract, tiny_backbone
from vlprompt_plugin_tcp import RECIPE, TCP, TCPOptions, prompt_template, replace_slots_per_row

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]
PET = "a photo of a {}, a type of pet."


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tcp"))


def build(bb, names=NAMES, **opts) -> TCP:
    torch.manual_seed(0)
    return TCP(bb, ClassSet(list(names), templates=[PET]), TCPOptions(**opts))


def features(bb, n=5, seed=0):
    with torch.no_grad():
        return bb.encode_image(torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))


def by_hand(m: TCP, bb, names=NAMES) -> torch.Tensor:
    """The text tower run block by block on each class's prompt "[SOS] ctx name , a type of
    pet . [EOS]" alone: class c's tokens replace positions 1..M before block ``class_layer``."""
    prior = F.normalize(bb.encode_text(bb.tokenize([PET.format(n) for n in names])).float(), dim=-1)
    tokens = m.tke(prior).reshape(len(names), m.ctx.shape[0], bb.text_width)
    feats = []
    for c, name in enumerate(names):
        ids = bb.tokenize([f"X X X X {name}, a type of pet."])  # the reference's placeholder prompt
        length = int(ids.argmax(-1)) + 1
        x = bb.embed_tokens(ids[:, :length]).float()
        x[0, 1:5] = m.ctx
        calls = []

        def hook(layer, h, c=c, calls=calls):
            calls.append(layer)
            if layer != m.class_layer:
                return h
            h = h.clone()
            h[0, 1:5] = tokens[c]
            return h

        feats.append(bb.encode_text_embeddings(x, ids[:, :length], block_hook=hook)[0])
        assert calls == list(range(bb.text_depth))
    return torch.stack(feats)


def test_class_tokens_enter_at_the_class_layer(bb):
    m = build(bb, prompt="{}, a type of pet.", class_layer=1)  # the tiny tower's 2 blocks: 0 and 1
    with torch.no_grad():
        assert torch.allclose(m.text_features(), by_hand(m, bb), atol=1e-5)


def test_class_tokens_differ_per_class_and_move_the_features(bb):
    m = build(bb, prompt="{}, a type of pet.", class_layer=1)
    with torch.no_grad():
        tokens = m.class_tokens()
        assert tokens.shape == (len(NAMES), 4, bb.text_width)
        assert (tokens[0] - tokens[1]).abs().max() > 1e-4
        with_tokens = m.text_features()
        m.tke.linear2.weight.zero_()
        m.tke.linear2.bias.zero_()
        zeroed = m.text_features()
    assert (with_tokens - zeroed).abs().max() > 1e-4  # the tokens reach the features


def test_rows_take_their_own_class_whatever_the_order():
    x = torch.zeros(3, 5, 2)
    slots = torch.tensor([[-1, 0, 1, -1, -1], [-1, 0, 1, -1, -1], [-1, -1, 0, 1, -1]])
    tokens = torch.arange(3 * 2 * 2, dtype=torch.float).reshape(3, 2, 2)
    out = replace_slots_per_row(x, slots, tokens)
    assert out[0, 1].tolist() == [0, 1] and out[0, 2].tolist() == [2, 3]
    assert out[1, 1].tolist() == [4, 5] and out[2, 3].tolist() == [10, 11]
    assert out[:, 0].abs().sum() == 0 and out[:, 4].abs().sum() == 0


def test_chunked_text_pass_is_the_same(bb):
    from vlprompt_core.prompting import text_chunking

    m = build(bb, class_layer=1)
    with torch.no_grad():
        whole = m.text_features()
        with text_chunking(1):
            chunked = m.text_features()
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_loss_by_hand(bb):
    m = build(bb, class_layer=1)
    m.train()
    batch = Batch(image_features=features(bb), labels=torch.tensor([0, 1, 2, 3, 0]))
    out = m(batch)
    with torch.no_grad():
        text = m.text_features()
    prior = F.normalize(bb.encode_text(bb.tokenize([PET.format(n) for n in NAMES])).float(), dim=-1)
    cos = [float(text[c] @ prior[c] / text[c].norm()) for c in range(len(NAMES))]
    expected = 8.0 * (1 - sum(cos) / len(cos))
    assert out.losses["kg"].item() == pytest.approx(expected, rel=1e-5)
    img = F.normalize(batch.image_features.float(), dim=-1)
    logits = bb.logit_scale * img @ F.normalize(text, dim=-1).T
    assert torch.allclose(out.logits, logits, atol=1e-4)
    assert m.loss(out, batch).item() == pytest.approx(F.cross_entropy(logits, batch.labels).item() + expected,
                                                      rel=1e-5)


def test_novel_classes_get_tokens_from_their_own_features(bb):
    m = build(bb, prompt="{}, a type of pet.", class_layer=1)
    m.set_classes(ClassSet(["purple", "orange"], templates=[PET]))
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m.text_features(), by_hand(m, bb, ["purple", "orange"]), atol=1e-5)
    assert m(Batch(image_features=features(bb))).logits.shape == (5, 2)


def test_trainable_tensors(bb):
    m = build(bb)
    trainable = {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}
    d, w = bb.embed_dim, bb.text_width
    assert trainable == {"ctx": (4, w), "tke.linear1.weight": (d // 4, d), "tke.linear1.bias": (d // 4,),
                         "tke.linear2.weight": (4 * w, d // 4), "tke.linear2.bias": (4 * w,)}


def test_class_layer_is_clamped_to_the_tower(bb):
    options = TCPOptions(class_layer=8)
    used = TCP.effective_options(options, BackboneInfo.of(bb))
    assert used.options.class_layer == bb.text_depth - 1
    assert used.notes == (f"class_layer 8 -> {bb.text_depth - 1}: the text tower has {bb.text_depth} blocks",)
    assert TCP.effective_options(options, BackboneInfo()).options.class_layer == 8  # unknown depth: as asked
    assert build(bb, class_layer=8).class_layer == bb.text_depth - 1


def test_prompt_words_and_layout(bb):
    assert prompt_template(4, "person doing {}.").pieces[1:] == ("person doing", "{}", ".")
    m = build(bb, prompt="{}, a type of car")
    ids, slots = m.template.layout(bb, "apple pie")
    ref = bb.tokenize(["X X X X apple pie, a type of car"])[0]
    assert ref[: len(ids)].tolist() == ids and slots[1:5] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="exactly once"):
        TCPOptions(prompt="a photo")
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        TCPOptions(class_layer=0)  # before block 0 the class tokens would replace the context itself


def test_recipe_is_the_official_config():
    train, options = RECIPE.for_context({"protocol": "base2novel", "shots": 16, "dataset": "imagenet"})
    assert (train["lr"], train["batch_size"], train["epochs"]) == (0.002, 32, 50)
    # Dassl's "adam" (torch.optim.Adam, L2 weight decay 5e-4) with the README's eps 1e-3
    assert (train["optimizer"], train["adam_eps"], train["weight_decay"]) == ("adam", 1e-3, 5e-4)
    assert (train["warmup_epochs"], train["warmup_lr"]) == (1, 1e-5)
    assert options == {"n_ctx": 4, "class_layer": 8, "kg_weight": 8.0}
    _, options = RECIPE.for_context({"protocol": "base2novel", "shots": 16, "dataset": "fgvc_aircraft"})
    assert options["prompt"] == "{}, a type of aircraft." and options["templates"] == ["a photo of an aircraft {}."]
    _, options = RECIPE.for_context({"protocol": "base2novel", "shots": 16, "dataset": "ucf101"})
    assert options["prompt"] == "person doing {}." and "templates" not in options


class TestTCPContract(MethodContract):
    method = "tcp"
    cases = [Case({}), Case({"n_ctx": 2, "class_layer": 1, "prompt": "{}, a colour.", "templates": "ensemble"})]
