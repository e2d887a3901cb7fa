"""MaPLe, IVLP, deep language prompting and deep VPT on a tiny random open_clip backbone
(16 px images, width 32; 2 blocks per tower, and a 3-block copy for deep prompts)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import BackboneInfo, Batch, ClassSet
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import class_text_features
from vlprompt_core.testing import TINY_CONFIG, Case, MethodContract
from vlprompt_plugin_maple import (
    IVLP,
    IVLPOptions,
    LanguageDeep,
    LanguageDeepOptions,
    MaPLe,
    MaPLeOptions,
    VPTDeep,
    VPTDeepOptions,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    """3 text and 3 image blocks, so that deep prompts reach blocks 1 and 2."""
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip

    config = json.loads(json.dumps(TINY_CONFIG))
    config["text_cfg"]["layers"] = config["vision_cfg"]["layers"] = 3
    path = tmp_path_factory.mktemp("maple") / "tiny_maple.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    return build_open_clip(OpenClipOptions(model=str(path), pretrained=None))


@pytest.fixture()
def classes():
    return ClassSet(list(NAMES))


def images(n=3, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def batch_of(bb, n=3):
    x = images(n)
    return Batch(images=x, image_features=bb.encode_image(x), labels=torch.arange(n) % len(NAMES))


# ----------------------------------------------------------------------- prompts


def test_maple_learns_the_first_two_words_and_keeps_of_a(bb, classes):
    """`[SOS] [ctx1 ctx2] of a <class> . [EOT]`, ctx starting as the embeddings of "a photo"."""
    m = MaPLe(bb, classes, MaPLeOptions())
    x = bb.tokenize_words("X")[0]
    for i, name in enumerate(NAMES):
        ids = bb.tokenize([f"a photo of a {name}."])[0]
        n = int(ids.argmax()) + 1
        row = m.text.prompts.token_ids[i, :n].tolist()
        assert row == [ids[0].item(), x, x, *ids[3:n].tolist()]
        assert m.text.prompts.slots[i, :n].tolist() == [-1, 0, 1] + [-1] * (n - 3)
    assert torch.equal(m.text.ctx.detach(), bb.embed_tokens(torch.tensor(bb.tokenize_words("a photo"))).float())


def test_without_deep_prompts_the_initial_text_is_the_hand_written_prompt(bb, classes):
    """Depth 1 and ctx from 'a photo': the text features are those of 'a photo of a {}.'."""
    m = MaPLe(bb, classes, MaPLeOptions(prompt_depth=1))
    assert len(m.text.deep) == len(m.deep_proj) == 0
    with torch.no_grad():
        got = F.normalize(m.text.features(bb), dim=-1)
    want = class_text_features(bb, NAMES, ["a photo of a {}."])
    assert torch.allclose(got, want, atol=1e-5)


def test_deep_text_prompts_replace_the_context_in_later_blocks(bb, classes):
    m = MaPLe(bb, classes, MaPLeOptions(prompt_depth=3))
    assert len(m.text.deep) == 2
    with torch.no_grad():
        before = m.text.features(bb)
        m.text.deep[1].add_(torch.randn_like(m.text.deep[1]))  # block 2's prompts (a constant would be normed away)
        after = m.text.features(bb)
    assert not torch.allclose(before, after, atol=1e-4)


def test_maple_couples_the_towers(bb, classes):
    """Vision prompts are projections of the text prompts: changing a text prompt moves the
    image features; the deep projections start as copies of one layer (the official clone)."""
    torch.manual_seed(0)
    m = MaPLe(bb, classes, MaPLeOptions(prompt_depth=3))
    assert torch.equal(m.deep_proj[0].weight, m.deep_proj[1].weight)
    assert not torch.equal(m.proj.weight, m.deep_proj[0].weight)
    x = images(2)
    with torch.no_grad():
        before = m.image_features(x)
        m.text.deep[0].add_(torch.randn_like(m.text.deep[0]))
        after = m.image_features(x)
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("method, options, trainable", [
    (MaPLe, MaPLeOptions(prompt_depth=3),
     ["text.ctx", "text.deep.0", "text.deep.1", "proj.weight", "proj.bias", "deep_proj.0.weight", "deep_proj.0.bias",
      "deep_proj.1.weight", "deep_proj.1.bias"]),
    (IVLP, IVLPOptions(prompt_depth_text=2, prompt_depth_vision=3),
     ["text.ctx", "text.deep.0", "vision.first", "vision.deep.0", "vision.deep.1"]),
    (LanguageDeep, LanguageDeepOptions(), ["text.ctx", "text.deep.0", "text.deep.1"]),
    (VPTDeep, VPTDeepOptions(), ["vision.first", "vision.deep.0", "vision.deep.1"]),
], ids=["maple", "ivlp", "language_deep", "vpt_deep"])
def test_gradients_reach_every_prompt_and_nothing_else(bb, classes, method, options, trainable):
    m = method(bb, classes, options)
    m.train()
    batch = batch_of(bb)
    m.loss(m(batch), batch).backward()
    assert [n for n, p in m.named_parameters() if p.requires_grad] == trainable
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in bb.parameters())


def test_vpt_deep_scores_against_the_frozen_hand_written_prompt(bb, classes):
    m = VPTDeep(bb, classes, VPTDeepOptions(n_ctx=3))
    assert torch.equal(m.text_features, class_text_features(bb, NAMES, ["a photo of a {}."]))
    assert m.vision.first.shape == (3, bb.vision_width)
    with pytest.raises(UserError, match="template"):
        VPTDeep(bb, classes, VPTDeepOptions(template="a photo"))


def test_prompts_are_random_with_the_init_std(bb, classes):
    torch.manual_seed(0)
    m = IVLP(bb, classes, IVLPOptions(n_ctx_vision=64, prompt_depth_vision=3, ctx_init="", n_ctx_text=24))
    for p in (m.vision.first, *m.vision.deep, m.text.ctx, *m.text.deep):
        assert abs(p.detach().std().item() - 0.02) < 0.004  # 768 to 2048 draws


def test_random_context_without_ctx_init(bb, classes):
    m = LanguageDeep(bb, classes, LanguageDeepOptions(ctx_init="", n_ctx=3))
    assert m.text.template.describe("red") == "[3 context vectors] red."


# ------------------------------------------------------------- stated settings


def info(**kw):
    return BackboneInfo(**kw)


def test_depths_are_clamped_to_the_towers_and_said():
    used = MaPLe.effective_options(MaPLeOptions(prompt_depth=9), info(text_depth=3, vision_depth=4))
    assert used.options.prompt_depth == 4  # the deeper tower: MaPLe's text prompts feed the image tower
    assert used.notes == ("prompt_depth 9 -> 4: the tower has 4 blocks",)
    used = IVLP.effective_options(IVLPOptions(), info(text_depth=3, vision_depth=4))
    assert (used.options.prompt_depth_text, used.options.prompt_depth_vision) == (3, 4)
    assert len(used.notes) == 2
    assert LanguageDeep.effective_options(LanguageDeepOptions(), info(text_depth=12)).notes == ()
    assert VPTDeep.effective_options(VPTDeepOptions(prompt_depth=2), info(vision_depth=12)).options.prompt_depth == 2
    unknown = MaPLe.effective_options(MaPLeOptions(), info())  # nothing known: kept as asked
    assert unknown.options.prompt_depth == 9 and unknown.notes == ()


def test_built_methods_use_the_clamped_depth(bb, classes):
    m = MaPLe(bb, classes, MaPLeOptions(prompt_depth=9))
    assert len(m.text.deep) == len(m.deep_proj) == 2  # 3 blocks: prompts before blocks 1 and 2
    v = VPTDeep(bb, classes, VPTDeepOptions(prompt_depth=12))
    assert len(v.vision.deep) == 2


def test_ctx_init_conflicts_are_told_before_a_run(bb):
    words = lambda text: len(bb.tokenize_words(text))  # noqa: E731
    backbone = info(text_depth=3, vision_depth=3, word_tokens=words)
    with pytest.raises(UserError, match="n_ctx 5 must be between 1 and the 4 tokens of ctx_init 'a photo of a'"):
        MaPLe.effective_options(MaPLeOptions(n_ctx=5), backbone)
    with pytest.raises(UserError, match="method.n_ctx_text"):
        IVLP.effective_options(IVLPOptions(n_ctx_text=7), backbone)
    assert MaPLe.effective_options(MaPLeOptions(n_ctx=5, ctx_init="", prompt_depth=2), backbone).notes == ()
    with pytest.raises(UserError, match="n_ctx 5"):
        MaPLe(bb, ClassSet(NAMES), MaPLeOptions(n_ctx=5))


# ------------------------------------------------------------------ contract


class TestMaPLeContract(MethodContract):
    method = "maple"
    cases = [Case({}), Case({"prompt_depth": 1, "ctx_init": "", "n_ctx": 3})]


class TestIVLPContract(MethodContract):
    method = "ivlp"
    cases = [Case({"prompt_depth_text": 2, "prompt_depth_vision": 1})]


class TestLanguageDeepContract(MethodContract):
    method = "language_deep"
    cases = [Case({})]


class TestVPTDeepContract(MethodContract):
    method = "vpt_deep"
    cases = [Case({"n_ctx": 2})]
