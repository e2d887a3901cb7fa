"""CoOp on a tiny random open_clip backbone (16 px images, width 32)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from vlprompt_core.api import Batch, ClassSet
from vlprompt_core.errors import UserError
from vlprompt_core.testing import Case, MethodContract, write_split_dataset, write_tiny_config
from vlprompt_plugin_coop import CoOp, CoOpOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]


@pytest.fixture(scope="module")
def coop_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("coop_world")
    return {"config": write_tiny_config(root), "data": root / "data",
            "specs": write_split_dataset(root / "data", "toy", per_class=(1, 1, 1))}


@pytest.fixture(scope="module")
def _backbone(coop_world):
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip

    torch.manual_seed(0)
    return build_open_clip(OpenClipOptions(model=str(coop_world["config"]), pretrained=None))


@pytest.fixture()
def tiny_backbone(_backbone):
    """The frozen backbone (shared; tests must not modify its weights)."""
    _backbone.zero_grad(set_to_none=True)
    return _backbone


@pytest.fixture()
def classes():
    return ClassSet(list(NAMES))


def build(backbone, classes, **opts) -> CoOp:
    return CoOp(backbone, classes, CoOpOptions(**opts))


def images(n=3, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ gradients


def test_only_ctx_receives_gradients(tiny_backbone, classes):
    torch.manual_seed(0)
    method = build(tiny_backbone, classes, n_ctx=4)
    method.train()
    out = method(Batch(image_features=tiny_backbone.encode_image(images(3))))
    assert out.logits.shape == (3, len(NAMES))
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2])).backward()

    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable == ["ctx"]
    for name, p in tiny_backbone.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
    assert method.ctx.grad is not None
    assert method.ctx.grad.shape == method.ctx.shape
    assert method.ctx.grad.abs().sum() > 0


# --------------------------------------------------------------------- layout


def _expected_layout(bb, name_ids, m, where):
    x = bb.tokenize_words("X")[0]
    dot = bb.tokenize_words(".")
    assert len(dot) == 1
    if where == "end":
        ids = [x] * m + name_ids + dot
        slots = list(range(m)) + [-1] * len(name_ids) + [-1]
    elif where == "front":
        ids = name_ids + [x] * m + dot
        slots = [-1] * len(name_ids) + list(range(m)) + [-1]
    else:
        h = m // 2
        ids = [x] * h + name_ids + [x] * (m - h) + dot
        slots = list(range(h)) + [-1] * len(name_ids) + list(range(h, m)) + [-1]
    return [bb.sot_id, *ids, bb.eot_id], [-1, *slots, -1]


@pytest.mark.parametrize("where, m", [("end", 4), ("front", 3), ("middle", 4), ("middle", 5), ("middle", 1)])
def test_prompt_layout_by_hand(tiny_backbone, classes, where, m):
    bb = tiny_backbone
    method = build(bb, classes, n_ctx=m, class_token_position=where)
    name_ids = bb.tokenize_words("apple pie")
    assert len(name_ids) == 2
    ids, slots = method.template.layout(bb, "apple pie")
    exp_ids, exp_slots = _expected_layout(bb, name_ids, m, where)
    assert ids == exp_ids
    assert slots == exp_slots


def test_prompt_layout_middle_odd_literal(tiny_backbone, classes):
    """M=5, middle: 2 context vectors, the name, then 3 (the reference's n_ctx // 2 split)."""
    bb = tiny_backbone
    method = build(bb, classes, n_ctx=5, class_token_position="middle")
    name = bb.tokenize_words("apple pie")
    x, dot = bb.tokenize_words("X")[0], bb.tokenize_words(".")[0]
    ids, slots = method.template.layout(bb, "apple pie")
    assert ids == [bb.sot_id, x, x, name[0], name[1], x, x, x, dot, bb.eot_id]
    assert slots == [-1, 0, 1, -1, -1, 2, 3, 4, -1, -1]


def test_end_layout_ids_match_tokenizer_of_placeholder_prompt(tiny_backbone, classes):
    """The reference builds 'X X X X apple pie.' and tokenizes it: same ids."""
    bb = tiny_backbone
    method = build(bb, classes, n_ctx=4)
    ids, _ = method.template.layout(bb, "apple pie")
    ref = bb.tokenize(["X X X X apple pie."])[0]
    assert ref[: len(ids)].tolist() == ids
    assert (ref[len(ids):] == 0).all()


def test_set_classes_buffers_pad_with_zero_and_minus_one(tiny_backbone, classes):
    bb = tiny_backbone
    method = build(bb, classes, n_ctx=3)
    table = method.prompts
    assert table.token_ids.shape == table.slots.shape == (len(NAMES), 1 + 3 + 2 + 1 + 1)
    for i, name in enumerate(NAMES):
        ids, slots = method.template.layout(bb, name)
        assert table.token_ids[i, : len(ids)].tolist() == ids
        assert table.slots[i, : len(slots)].tolist() == slots
        assert (table.token_ids[i, len(ids):] == 0).all()
        assert (table.slots[i, len(slots):] == -1).all()
    assert torch.equal(table.embeddings, bb.embed_tokens(table.token_ids).float())


# ------------------------------------------------------------------ ctx_init


def test_ctx_init_sets_n_ctx_and_initial_vectors(tiny_backbone, classes):
    bb = tiny_backbone
    method = build(bb, classes, ctx_init="a photo of a", n_ctx=16)
    words = bb.tokenize_words("a photo of a")
    assert len(words) == 4
    assert method.n_ctx == 4
    assert method.ctx.shape == (4, bb.text_width)
    assert torch.equal(method.ctx.detach(), bb.embed_tokens(torch.tensor(words)).float())


def test_ctx_init_text_features_equal_hand_written_prompt(tiny_backbone, classes):
    """The whole assembly path: placeholders + ctx + positions + truncation + pooling."""
    bb = tiny_backbone
    method = build(bb, classes, ctx_init="a photo of a")
    with torch.no_grad():
        got = method.text_features()
        ref = bb.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES]))
    assert got.shape == (len(NAMES), bb.embed_dim)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_random_ctx_text_features_differ_from_hand_written_prompt(tiny_backbone, classes):
    """Sanity check that the comparison above can fail."""
    bb = tiny_backbone
    method = build(bb, classes, n_ctx=4)
    with torch.no_grad():
        got = method.text_features()
        ref = bb.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES]))
    assert not torch.allclose(got, ref, atol=1e-3)


# ----------------------------------------------------------------------- csc


def test_csc_gives_one_context_per_class(tiny_backbone, classes):
    torch.manual_seed(0)
    bb = tiny_backbone
    method = build(bb, classes, n_ctx=3, csc=True)
    assert method.ctx.shape == (len(NAMES), 3, bb.text_width)
    with torch.no_grad():
        before = method.text_features()
        method.ctx[1] += 0.5
        after = method.text_features()
    changed = ~torch.isclose(before, after).all(dim=-1)
    assert changed.tolist() == [False, True, False, False]


def test_csc_rejects_other_class_names(tiny_backbone, classes):
    method = build(tiny_backbone, classes, n_ctx=2, csc=True)
    method.set_classes(ClassSet(list(NAMES)))  # the same classes are fine
    with pytest.raises(UserError, match="csc"):
        method.set_classes(ClassSet(["red", "green"]))


def test_csc_with_ctx_init_is_a_validation_error():
    with pytest.raises(ValidationError, match="csc"):
        CoOpOptions(csc=True, ctx_init="a photo of a")
    CoOpOptions(csc=True)  # each alone is fine
    CoOpOptions(ctx_init="a photo of a")


def test_csc_with_ctx_init_in_spec_is_user_error(coop_world, monkeypatch):
    from vlprompt_core.plugins import build_registry, make_plugin_manager
    from vlprompt_core.spec import validate_spec

    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", str(coop_world["specs"]))
    registry = build_registry(*make_plugin_manager())  # leaves the process-wide registry alone
    world = coop_world

    spec = {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "coop", "csc": True, "ctx_init": "a photo of a"},
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot"},
    }
    with pytest.raises(UserError) as exc:
        validate_spec(spec, registry)
    assert any("csc applies to random initialisation only" in p for p in exc.value.problems)


# ---------------------------------------------------------------------- init


def test_random_init_std(tiny_backbone, classes):
    torch.manual_seed(0)
    # csc: 4 classes x 16 vectors x width 32 = 2048 draws from N(0, 0.02^2)
    ctx = build(tiny_backbone, classes, n_ctx=16, csc=True).ctx.detach()
    assert ctx.shape == (len(NAMES), 16, tiny_backbone.text_width)
    assert abs(ctx.std().item() - 0.02) < 0.002
    assert abs(ctx.mean().item()) < 0.002
    shared = build(tiny_backbone, classes, n_ctx=16).ctx.detach()
    assert abs(shared.std().item() - 0.02) < 0.004
    wide = build(tiny_backbone, classes, n_ctx=16, csc=True, init_std=0.1).ctx.detach()
    assert abs(wide.std().item() - 0.1) < 0.01


# ------------------------------------------------------------------- caching


def test_eval_cache_matches_train_and_is_cleared(tiny_backbone, classes):
    torch.manual_seed(0)
    method = build(tiny_backbone, classes, n_ctx=4)
    feats = torch.randn(5, tiny_backbone.embed_dim)
    method.train()
    train_logits = method(Batch(image_features=feats)).logits.detach()
    assert not method._cache  # training never caches

    method.eval()
    first = method(Batch(image_features=feats)).logits
    assert "text_features" in method._cache
    assert torch.allclose(first, train_logits, atol=1e-6)

    with torch.no_grad():
        method.ctx.add_(torch.randn_like(method.ctx))  # the cache is static: eval logits stay
    assert torch.equal(method(Batch(image_features=feats)).logits, first)

    method.train()  # clears the cache
    assert not method._cache
    moved = method(Batch(image_features=feats)).logits.detach()
    assert not torch.allclose(moved, first, atol=1e-4)
    method.eval()
    assert torch.allclose(method(Batch(image_features=feats)).logits, moved, atol=1e-6)

    # set_classes clears it too: new classes, new logits shape
    method.set_classes(ClassSet(["red", "blue"]))
    assert not method._cache
    assert method(Batch(image_features=feats)).logits.shape == (5, 2)


# ------------------------------------------------------------------ contract


class TestCoOpContract(MethodContract):
    method = "coop"
    cases = [
        Case({"n_ctx": 4}),
        Case({"ctx_init": "a photo of a", "class_token_position": "middle"}),
        Case({"n_ctx": 2, "csc": True}, fixed_classes=True),
    ]
