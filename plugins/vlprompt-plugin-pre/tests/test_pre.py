"""PRE's mathematics on a tiny random backbone, and the method contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlprompt_core.api import Batch, ClassSet
from vlprompt_core.prompting import PromptTable, PromptTemplate
from vlprompt_core.testing import Case, MethodContract, tiny_backbone
from vlprompt_core.testing import frozen_features as features
from vlprompt_kernels import cosine_logits
from vlprompt_plugin_pre import PRE, PREOptions

NAMES = ["red", "green", "apple pie", "blue"]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("pre"))


def build(bb, seed=0, **opts):
    torch.manual_seed(seed)
    return PRE(bb, ClassSet(NAMES), PREOptions(**opts))


@pytest.mark.parametrize("encoder", ["lstm", "lstm2", "mlp", "mlp2"])
def test_zero_encoder_output_equals_coop_exactly(bb, encoder):
    """With the encoder's output at zero, ctx' = ctx: PRE is CoOp with the same context
    (CoOp's computation written out: the context in the prompt table, cosine logits)."""
    pre = build(bb, encoder=encoder)
    with torch.no_grad():
        if encoder.startswith("lstm"):
            for p in pre.encoder.parameters():  # all gates 0.5, cell input tanh(0) = 0 -> h = 0
                p.zero_()
        else:
            pre.encoder.mlp.linear2.weight.zero_()
            pre.encoder.mlp.linear2.bias.zero_()
    f = features(bb, 3)
    pre.eval()
    with torch.no_grad():
        coop_text = PromptTable(bb, NAMES, PromptTemplate.with_context(4)).encode(bb, pre.ctx)
        coop_logits = cosine_logits(f, coop_text, bb.logit_scale)
        assert torch.equal(pre.encoded_context(), pre.ctx)
        assert torch.equal(pre(Batch(image_features=f)).logits, coop_logits)


def test_bilstm_reads_the_context_as_one_sequence_both_ways(bb):
    """encoder(ctx)[m] = [h_fwd(ctx_1..m) | h_bwd(ctx_M..m)], from two one-way LSTMs with the same weights."""
    pre = build(bb)
    lstm = pre.encoder.lstm
    w = bb.text_width
    fwd, bwd = (nn.LSTM(w, w // 2, batch_first=True) for _ in range(2))
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(fwd, name).copy_(getattr(lstm, name))
            getattr(bwd, name).copy_(getattr(lstm, name + "_reverse"))
        ctx = pre.ctx
        expected = torch.cat([fwd(ctx)[0], bwd(ctx.flip(0))[0].flip(0)], dim=-1)
        assert torch.allclose(pre.encoder(ctx), expected, atol=1e-6)
        assert torch.allclose(pre.encoded_context(), expected + ctx, atol=1e-6)
        # the first vector's encoding depends on the last vector (the backward direction)
        moved = ctx.clone()
        moved[-1] += 1.0
        assert not torch.allclose(pre.encoder(moved)[0], pre.encoder(ctx)[0], atol=1e-4)


def test_mlp2_applies_the_same_weights_twice(bb):
    pre = build(bb, encoder="mlp2", mlp_hidden=8)
    mlp = pre.encoder.mlp
    assert [n for n, _ in pre.encoder.named_parameters()] == ["mlp.linear1.weight", "mlp.linear1.bias",
                                                             "mlp.linear2.weight", "mlp.linear2.bias"]
    with torch.no_grad():
        x = pre.ctx
        once = mlp.linear2(torch.relu(mlp.linear1(x)))
        twice = mlp.linear2(torch.relu(mlp.linear1(once)))
        assert torch.allclose(pre.encoded_context(), twice + x, atol=1e-6)
    assert torch.allclose(build(bb, encoder="mlp", mlp_hidden=8, residual=False).encoded_context(),
                          build(bb, encoder="mlp", mlp_hidden=8).encoded_context() - pre.ctx, atol=1e-6)


def test_one_word_initialisation_works(bb):
    """The official code crashes here (``.squeeze()`` drops the sequence axis)."""
    pre = build(bb, ctx_init="photo")
    assert pre.ctx.shape == (1, bb.text_width)
    out = pre(Batch(image_features=features(bb, 2)))
    assert out.logits.shape == (2, len(NAMES)) and torch.isfinite(out.logits).all()


def test_evaluation_encodes_the_context_once(bb):
    pre = build(bb)
    calls = []
    pre.encoder.register_forward_hook(lambda *a: calls.append(1))
    f = features(bb, 6)
    pre.eval()
    with torch.no_grad():
        first = pre(Batch(image_features=f[:3])).logits
        pre(Batch(image_features=f[3:]))
    assert len(calls) == 1
    pre.train()
    pre(Batch(image_features=f[:3]))
    pre(Batch(image_features=f[:3]))
    assert len(calls) == 3  # training recomputes every step
    pre.eval()
    with torch.no_grad():
        assert torch.allclose(pre(Batch(image_features=f[:3])).logits, first, atol=1e-6)


def test_parameters(bb):
    w = bb.text_width
    lstm = build(bb)
    names = {n for n, p in lstm.named_parameters() if p.requires_grad}
    assert names == {"ctx"} | {f"encoder.lstm.{k}_l0{s}" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                               for s in ("", "_reverse")}
    n = sum(p.numel() for p in lstm.parameters() if p.requires_grad)
    h = w // 2
    assert n == 4 * w + 2 * (4 * h * w + 4 * h * h + 8 * h)
    csc = build(bb, ctx_init="", n_ctx=3, csc=True)
    assert csc.ctx.shape == (len(NAMES), 3, w) and csc.encoded_context().shape == (len(NAMES), 3, w)


class TestPREContract(MethodContract):
    method = "pre"
    cases = [Case({}), Case({"encoder": "mlp2", "class_token_position": "middle", "ctx_init": "", "n_ctx": 3}),
             Case({"encoder": "lstm", "ctx_init": "", "n_ctx": 2, "csc": True}, fixed_classes=True)]
