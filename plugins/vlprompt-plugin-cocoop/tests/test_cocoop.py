"""CoCoOp's mathematics on a tiny random backbone, and the method contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import Batch, ClassSet
from vlprompt_core.prompting import PromptTable, PromptTemplate, text_chunking
from vlprompt_core.testing import Case, MethodContract, tiny_backbone
from vlprompt_core.testing import frozen_features as features
from vlprompt_kernels import cosine_logits
from vlprompt_plugin_cocoop import CoCoOp, CoCoOpOptions

NAMES = ["red", "green", "apple pie", "blue", "yellow"]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("cocoop"))


def build(bb, seed=0, **opts):
    torch.manual_seed(seed)
    m = CoCoOp(bb, ClassSet(NAMES), CoCoOpOptions(**opts))
    with torch.no_grad():  # a Meta-Net far from zero, so shifts are visible
        for p in m.meta_net.parameters():
            p.normal_(0, 0.5)
    return m


def test_shapes_and_meta_net_widths(bb):
    m = CoCoOp(bb, ClassSet(NAMES), CoCoOpOptions())
    assert m.ctx.shape == (4, bb.text_width)  # "a photo of a"
    assert m.meta_net.linear1.weight.shape == (bb.embed_dim // 16, bb.embed_dim)
    assert m.meta_net.linear2.weight.shape == (bb.text_width, bb.embed_dim // 16)
    assert CoCoOp(bb, ClassSet(NAMES), CoCoOpOptions(meta_hidden=7)).meta_net.linear1.out_features == 7
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    e, w, h = bb.embed_dim, bb.text_width, bb.embed_dim // 16
    assert n == 4 * w + (e * h + h) + (h * w + w)


def test_shift_is_shared_by_the_context_vectors_of_an_image_and_differs_across_images(bb):
    m = build(bb)
    ctx = m.image_context(features(bb, 3)).detach()
    shift = ctx - m.ctx.detach()[None]  # [B, M, W]
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6)  # same for every vector
    assert not torch.allclose(shift[0, 0], shift[1, 0], atol=1e-3)  # differs across images
    # the Meta-Net reads the normalised feature: scaling the feature changes nothing
    f = features(bb, 3)
    assert torch.allclose(m.image_context(f), m.image_context(3.7 * f), atol=1e-6)


def test_logits_equal_the_equation(bb):
    """logits[b, c] = s * cos(f_b, T(ctx + pi(f_b), c)), written out per image."""
    m = build(bb)
    f = features(bb, 3)
    with torch.no_grad():
        got = m(Batch(image_features=f)).logits
        fn = F.normalize(f, dim=-1)
        table = PromptTable(bb, NAMES, PromptTemplate.with_context(4))
        rows = []
        for b in range(3):
            pi = m.meta_net.linear2(torch.relu(m.meta_net.linear1(fn[b])))
            text = F.normalize(table.encode(bb, m.ctx + pi), dim=-1)
            rows.append(bb.logit_scale * text @ fn[b])
    assert torch.allclose(got, torch.stack(rows), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 7])
def test_batch_of_32_equals_32_single_image_forwards(bb, chunk):
    m = build(bb)
    f = features(bb, 32, seed=1)
    with torch.no_grad(), text_chunking(chunk):
        batched = m(Batch(image_features=f)).logits
        single = torch.cat([m(Batch(image_features=f[i : i + 1])).logits for i in range(32)])
    assert batched.shape == (32, len(NAMES))
    assert torch.allclose(batched, single, atol=1e-4, rtol=1e-5)


def test_chunked_training_step_gives_the_same_gradients(bb):
    f = features(bb, 6)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    grads = []
    for chunk in (0, 4):
        m = build(bb)
        m.train()
        with text_chunking(chunk):
            out = m(Batch(image_features=f, labels=labels))
            m.loss(out, Batch(labels=labels)).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_uses_the_kernel_api(bb):
    """No hand-written cosine logits: the output is cosine_logits of the per-image text."""
    m = build(bb)
    f = features(bb, 2)
    with torch.no_grad():
        fn = F.normalize(f, dim=-1)
        text = m.prompts.encode(bb, m.image_context(fn)[:, None])
        assert torch.equal(m(Batch(image_features=f)).logits, cosine_logits(fn, text, bb.logit_scale))


class TestCoCoOpContract(MethodContract):
    method = "cocoop"
    cases = [Case({}), Case({"ctx_init": "", "n_ctx": 2})]
