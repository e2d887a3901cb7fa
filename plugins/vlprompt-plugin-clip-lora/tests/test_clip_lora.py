"""CLIP-LoRA on a tiny random open_clip backbone: the low-rank update against edited weights,
its scaling, initialisation and dropout, the towers and blocks it adapts (the official
presets), novel classes, the iteration budget of the recipe, and the method contract."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import BackboneInfo, Batch, ClassSet, ProjectionSite
from vlprompt_core.errors import UserError
from vlprompt_core.testing import Case, MethodContract, edited_backbone, random_images, tiny_backbone
from vlprompt_plugin_clip_lora import (
    RECIPE,
    CLIPLoRA,
    CLIPLoRAOptions,
    blocks,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]
PROMPT = "a photo of a {}."


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("lora"))


def build(bb, names=NAMES, **opts) -> CLIPLoRA:
    torch.manual_seed(0)
    return CLIPLoRA(bb, ClassSet(list(names)), CLIPLoRAOptions(**opts))


def randomise(m: CLIPLoRA, seed: int = 1, std: float = 0.2) -> None:
    """Trained-like LoRA tensors: B away from its zero initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in m.lora_B:
            m.lora_A[name].copy_(torch.randn(m.lora_A[name].shape, generator=g) * std)
            m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=g) * std)


def merged_backbone(m: CLIPLoRA):
    """A copy of the backbone whose projection weights are ``W + s * B A`` (the update merged)."""
    with torch.no_grad():
        deltas = {site: m.scaling * m.lora_B[name] @ m.lora_A[name] for site, name in m.sites.items()}
    return edited_backbone(m.backbone, deltas)


def by_hand(merged, images, names=NAMES, prompt=PROMPT, scale=None):
    """The scaled cosine of the merged model's image and prompt features."""
    with torch.no_grad():
        text = merged.encode_text(merged.tokenize([prompt.format(n) for n in names]))
        image = merged.encode_image(images)
    return (scale or merged.logit_scale) * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T


def scores(m, images):
    with torch.no_grad():
        return m(Batch(images=images)).logits


@pytest.mark.parametrize("opts", [
    {},
    {"params": ["q", "k", "v", "o"], "r": 3, "alpha": 2.0},
    {"encoder": "text", "params": ["v", "o"]},
    {"encoder": "vision", "position": [1], "rank_scaling": "linear", "r": 4},
    {"position": "top1", "logit_scale": 100.0, "prompt": "{} texture."},
], ids=["defaults", "qkvo", "text", "vision", "top1"])
def test_lora_is_the_merged_update(bb, opts):
    """Eval-mode scores = the scaled cosine of a model whose projections are W + s * B A."""
    m = build(bb, **opts)
    randomise(m)
    m.eval()
    images = random_images(bb, 3, seed=2)
    prompt = opts.get("prompt", PROMPT)
    want = by_hand(merged_backbone(m), images, prompt=prompt, scale=opts.get("logit_scale"))
    got = scores(m, images)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    zero_shot = by_hand(bb, images, prompt=prompt, scale=opts.get("logit_scale"))
    assert (got - zero_shot).abs().max() > 1e-3  # the update does change the scores


def test_scaling_is_alpha_over_sqrt_r_or_over_r(bb):
    assert build(bb).scaling == pytest.approx(1 / math.sqrt(2))  # the official default: r 2, alpha 1
    assert build(bb, r=4, alpha=2.0).scaling == pytest.approx(1.0)
    assert build(bb, r=4, alpha=2.0, rank_scaling="linear").scaling == pytest.approx(0.5)


def test_hook_adds_the_scaled_low_rank_branch(bb):
    """hook(site, x, y) = y + s * (x A^T) B^T at an adapted site, y elsewhere (eval: no dropout)."""
    m = build(bb, r=3, alpha=1.5)
    randomise(m)
    m.eval()
    site = ProjectionSite("text", 1, "k")
    name = m.sites[site]
    x, y = torch.randn(2, 5, bb.text_width), torch.randn(2, 5, bb.text_width)
    want = y + (x @ m.lora_A[name].T @ m.lora_B[name].T) * (1.5 / math.sqrt(3))
    assert torch.allclose(m.hook(site, x, y), want, atol=1e-6)
    assert m.hook(ProjectionSite("text", 1, "out"), x, y) is y  # 'o' not adapted by default


def test_initialisation_starts_at_zero_shot_clip(bb):
    """B = 0: the scores are zero-shot CLIP's with the prompt; A is Kaiming-uniform (a = sqrt 5):
    bounded by 1 / sqrt(fan_in), as nn.Linear's weight."""
    m = build(bb)
    images = random_images(bb, 3, seed=3)
    m.eval()
    assert torch.allclose(scores(m, images), by_hand(bb, images), atol=1e-4)
    for name, b in m.lora_B.items():
        a = m.lora_A[name]
        assert torch.count_nonzero(b) == 0 and a.shape == (2, b.shape[0]) and b.shape[1] == 2
        # U(-1/sqrt(in), 1/sqrt(in)): std 1/sqrt(3 in)
        assert a.abs().max() <= 1 / math.sqrt(a.shape[1]) and a.std() > 0.25 / math.sqrt(a.shape[1])


def test_dropout_acts_on_the_low_rank_branch_only(bb):
    m = build(bb, dropout=0.5)
    x = torch.ones(200, 50)
    m.train()
    torch.manual_seed(0)
    dropped = m.lora_input(ProjectionSite("image", 0, "q"), x)
    assert set(dropped.unique().tolist()) == {0.0, 2.0}  # kept values scaled by 1 / (1 - p)
    assert 0.45 < (dropped == 0).float().mean() < 0.55
    m.eval()
    assert m.lora_input(ProjectionSite("image", 0, "q"), x) is x
    # with B = 0 the branch adds nothing whatever is dropped: training-mode scores equal eval's
    images = random_images(bb, 2, seed=4)
    m.train()
    train_scores = scores(m, images)
    m.eval()
    assert torch.allclose(train_scores, scores(m, images), atol=1e-5)
    # with B != 0, training-mode scores vary with the draw
    randomise(m)
    m.train()
    torch.manual_seed(1)
    first = scores(m, images)
    torch.manual_seed(2)
    assert (scores(m, images) - first).abs().max() > 1e-4


def test_sites_follow_encoder_position_and_params(bb):
    names = sorted(build(bb).lora_A)
    assert names == sorted(f"{t}_{layer}_{p}" for t in ("text", "image") for layer in (0, 1) for p in "qkv")
    assert sorted(build(bb, encoder="text", params=["o"]).lora_A) == ["text_0_out", "text_1_out"]
    assert sorted(build(bb, encoder="vision", position="top1", params=["v"]).lora_A) == ["image_1_v"]
    m = build(bb, encoder="vision", r=5)
    assert all(a.shape == (5, bb.vision_width) and a.dtype == torch.float32 for a in m.lora_A.values())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"lora_{w}.image_{layer}_{p}" for w in "AB" for layer in (0, 1) for p in "qkv"}


def test_presets_are_the_official_block_lists():
    """On 12 blocks, INDEX_POSITIONS_TEXT / INDEX_POSITIONS_VISION['ViT-B/16'] of loralib/utils.py;
    on ViT-L/14's 24-block image tower, its three lists."""
    official = {"top1": [11], "top2": [10, 11], "top3": [9, 10, 11], "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7],
                "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11], "half-bottom": [0, 1, 2, 3, 4, 5],
                "all": list(range(12))}
    for name, layers in official.items():
        assert blocks(name, 12) == layers, name
    assert blocks("half-up", 24) == list(range(12, 24))
    assert blocks("half-bottom", 24) == list(range(12))
    assert blocks("all", 24) == list(range(24))
    assert blocks([3, 1], 12) == [1, 3]


def test_frozen_tower_is_the_frozen_model(bb):
    images = random_images(bb, 3, seed=5)
    vision = build(bb, encoder="vision")
    text = build(bb, encoder="text")
    with torch.no_grad():
        want_text = F.normalize(bb.encode_text(bb.tokenize([PROMPT.format(n) for n in NAMES])), dim=-1)
        assert torch.allclose(F.normalize(vision.class_features(), dim=-1), want_text, atol=1e-5)
        assert torch.equal(text.encode_images(images), bb.encode_image(images))
    assert "frozen_text" not in vision.state_dict()  # rebuilt from the class names, never checkpointed


def test_novel_classes_go_through_the_adapted_text_tower(bb):
    m = build(bb)
    randomise(m)
    m.eval()
    merged = merged_backbone(m)
    novel = ["purple", "orange", "sea turtle"]
    m.set_classes(ClassSet(novel))
    images = random_images(bb, 3, seed=6)
    got = scores(m, images)
    assert got.shape == (3, 3)
    assert torch.allclose(got, by_hand(merged, images, names=novel), atol=1e-4)


def test_a_training_step_moves_only_lora_and_the_backbone_stays(bb):
    m = build(bb)
    randomise(m)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    m.train()
    images = random_images(bb, 4, seed=7)
    batch = Batch(images=images, labels=torch.tensor([0, 1, 2, 3]))
    out = m(batch)
    loss = m.loss(out, batch)
    assert loss.item() == pytest.approx(F.cross_entropy(out.logits, batch.labels).item())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert all(p.grad is None for p in bb.parameters())
    torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2).step()
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in before.items())


def test_positions_beyond_the_tower_are_one_line_errors(bb):
    info = BackboneInfo.of(bb)
    from vlprompt_core.plugins import get_registry

    entry = get_registry().get("method", "clip_lora")
    with pytest.raises(UserError, match=r"method.position: block 5 beyond the 2-block text tower \(blocks 0-1\)"):
        entry.effective(CLIPLoRAOptions(position=[0, 5]), info)
    with pytest.raises(UserError, match="'bottom' selects no block of the 2-block text tower"):
        entry.effective(CLIPLoRAOptions(position="bottom"), info)
    used = entry.effective(CLIPLoRAOptions(position="mid", encoder="vision"), info)
    assert used.notes == ("position 'mid' on the 2-block image tower: blocks [0]",)
    assert entry.effective(CLIPLoRAOptions(), BackboneInfo()).notes == ()  # depths unknown: nothing to say


def test_a_backbone_without_projection_hooks_is_refused_in_one_line(bb, monkeypatch):
    assert CLIPLoRA.requires == ("projection_hooks",)  # checked by validate and before a run
    monkeypatch.setattr(bb, "capabilities", frozenset({"vision_transformer"}))
    with pytest.raises(UserError) as exc:
        build(bb)
    (line,) = exc.value.problems
    assert "method clip_lora needs attention projections reachable in both towers" in line and "\n" not in line


@pytest.mark.parametrize("bad", [{"params": ["q", "q"]}, {"params": []}, {"prompt": "a photo"},
                                 {"dropout": 1.0}, {"r": 0}, {"position": []}, {"position": [-1]},
                                 {"position": "middle"}, {"encoder": "image"}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        CLIPLoRAOptions(**bad)


def test_recipe_is_the_official_one():
    train, options = RECIPE.for_context({"protocol": "few_shot", "shots": 16, "dataset": "imagenet"})
    assert (train["optimizer"], train["lr"], train["weight_decay"], train["batch_size"]) == ("adamw", 2e-4, 1e-2, 32)
    assert (train["schedule"], train["schedule_per"], train["min_lr"], train["warmup_epochs"]) == (
        "cosine", "step", 1e-6, 0)
    assert train["steps"] == 8000 and "epochs" not in train  # 500 x 16 optimiser steps, whatever the classes
    assert options == {}
    assert RECIPE.for_context({"protocol": "few_shot", "shots": 1, "dataset": "eurosat"})[0]["steps"] == 500
    assert RECIPE.for_context({"protocol": "base2novel", "shots": 4, "dataset": "dtd"})[0]["steps"] == 2000
    assert "steps" not in RECIPE.for_context({"protocol": "few_shot", "shots": 3, "dataset": "other"})[0]


class TestCLIPLoRAContract(MethodContract):
    method = "clip_lora"
    cases = [
        Case({}),
        Case({"encoder": "vision", "position": [1], "params": ["v", "o"], "r": 3, "rank_scaling": "linear",
              "dropout": 0.0}),
    ]

    def build(self, entry, backbone, case, names=None, seed=0, fitted=True):
        """The battery's methods start from trained-like tensors: at LoRA's initialisation
        B = 0 blocks every gradient of A by construction."""
        from vlprompt_core.testing.contract import NAMES as CONTRACT_NAMES

        method = super().build(entry, backbone, case, CONTRACT_NAMES if names is None else names, seed, fitted)
        randomise(method, seed=seed + 10, std=0.05)
        return method
