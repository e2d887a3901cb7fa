"""The PyTorch reference ops against hand-built loops and hand-computed values.

These references are the ground truth fused kernels are tested against, so they
are checked here element by element, not against themselves.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprompt_kernels import assemble_prompts, cosine_logits

FAST = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------- helpers


def naive_assemble(base, ctx, slots, positional=None):
    """One element at a time: ``out[*s, c, t] = ctx[*s', c', slots[c, t]]`` or ``base[c, t]``.

    ``s'``/``c'`` index ctx's leading dims, using 0 wherever ctx has size 1 (or
    lacks the dim), i.e. broadcasting written out by hand.
    """
    n_cls, length, dim = base.shape
    ctx_lead = tuple(ctx.shape[:-2])
    lead = torch.broadcast_shapes(ctx_lead, (n_cls,))
    out = torch.empty(*lead, length, dim, dtype=base.dtype)
    for idx in itertools.product(*[range(n) for n in lead]):
        c = idx[-1]
        # the trailing len(ctx_lead) indices of idx address ctx; size-1 dims use 0
        sub = idx[len(idx) - len(ctx_lead):] if ctx_lead else ()
        sub = tuple(0 if size == 1 else i for i, size in zip(sub, ctx_lead))
        for t in range(length):
            j = int(slots[c, t])
            value = ctx[sub + (j,)] if j >= 0 else base[c, t]
            if positional is not None:
                value = value + positional[t]
            out[idx + (t,)] = value
    return out


def naive_cosine(image, text, scale):
    """float64 ``scale * cos(image_b, text_(b)c)`` with explicit loops."""
    image = image.double()
    text = text.double()
    b_n = image.shape[0]
    c_n = text.shape[-2]
    out = torch.empty(b_n, c_n, dtype=torch.float64)
    for b in range(b_n):
        a = image[b]
        for c in range(c_n):
            t = text[c] if text.dim() == 2 else text[b, c]
            na = max(math.sqrt(float((a * a).sum())), 1e-12)
            nt = max(math.sqrt(float((t * t).sum())), 1e-12)
            out[b, c] = scale * float((a * t).sum()) / (na * nt)
    return out


def coop_slots(n_cls: int, length: int, m: int, start: int = 1) -> torch.Tensor:
    """CoOp's 'end' layout: context vectors 0..m-1 at positions start..start+m-1."""
    slots = torch.full((n_cls, length), -1, dtype=torch.long)
    slots[:, start : start + m] = torch.arange(m)
    return slots


# ------------------------------------------------------------- assemble_prompts


def test_shared_ctx_equals_concatenation():
    torch.manual_seed(0)
    C, L, M, D = 3, 9, 4, 5
    base = torch.randn(C, L, D)
    ctx = torch.randn(M, D)
    out = assemble_prompts(base, ctx, coop_slots(C, L, M))
    expected = torch.cat([base[:, :1], ctx.expand(C, M, D), base[:, 1 + M :]], dim=1)
    assert out.shape == (C, L, D)
    assert torch.equal(out, expected)


def test_shared_ctx_matches_loop_with_irregular_slots():
    torch.manual_seed(1)
    C, L, M, D = 3, 7, 3, 4
    base = torch.randn(C, L, D)
    ctx = torch.randn(M, D)
    # each class puts the context somewhere else; class 2 reuses vector 0 twice
    slots = torch.tensor([
        [-1, 0, 1, 2, -1, -1, -1],
        [-1, -1, -1, 0, 1, 2, -1],
        [0, -1, 2, -1, 0, 1, -1],
    ])
    out = assemble_prompts(base, ctx, slots)
    assert torch.equal(out, naive_assemble(base, ctx, slots))
    # positions marked -1 keep the base embedding, bit for bit
    keep = slots < 0
    assert torch.equal(out[keep], base[keep])
    assert torch.equal(out[2, 4], ctx[0]) and torch.equal(out[2, 0], ctx[0])


def test_per_class_ctx():
    torch.manual_seed(2)
    C, L, M, D = 4, 8, 3, 5
    base = torch.randn(C, L, D)
    ctx = torch.randn(C, M, D)
    slots = coop_slots(C, L, M, start=2)
    out = assemble_prompts(base, ctx, slots)
    assert out.shape == (C, L, D)
    assert torch.equal(out, naive_assemble(base, ctx, slots))
    for c in range(C):
        assert torch.equal(out[c, 2 : 2 + M], ctx[c])
        assert torch.equal(out[c, :2], base[c, :2])
        assert torch.equal(out[c, 2 + M :], base[c, 2 + M :])


def test_per_image_ctx_broadcasts_to_batch_and_classes():
    torch.manual_seed(3)
    B, C, L, M, D = 2, 3, 7, 2, 4
    base = torch.randn(C, L, D)
    ctx = torch.randn(B, 1, M, D)
    slots = coop_slots(C, L, M)
    out = assemble_prompts(base, ctx, slots)
    assert out.shape == (B, C, L, D)
    assert torch.equal(out, naive_assemble(base, ctx, slots))
    for b in range(B):
        for c in range(C):
            assert torch.equal(out[b, c, 1 : 1 + M], ctx[b, 0])
            assert torch.equal(out[b, c, 0], base[c, 0])


def test_per_image_and_class_ctx():
    torch.manual_seed(4)
    B, C, L, M, D = 2, 3, 6, 2, 3
    base = torch.randn(C, L, D)
    ctx = torch.randn(B, C, M, D)
    slots = coop_slots(C, L, M, start=3)
    out = assemble_prompts(base, ctx, slots)
    assert out.shape == (B, C, L, D)
    assert torch.equal(out, naive_assemble(base, ctx, slots))
    assert torch.equal(out[1, 2, 3:5], ctx[1, 2])
    assert not torch.equal(out[0, 2, 3:5], out[1, 2, 3:5])


def test_positional_embedding_is_added_to_every_position():
    torch.manual_seed(5)
    C, L, M, D = 2, 5, 2, 3
    base = torch.randn(C, L, D)
    ctx = torch.randn(M, D)
    positional = torch.randn(L + 4, D)  # longer than L: only the first L rows are used
    slots = coop_slots(C, L, M)
    out = assemble_prompts(base, ctx, slots, positional)
    without = assemble_prompts(base, ctx, slots)
    assert torch.equal(out, without + positional[:L])
    assert torch.equal(out, naive_assemble(base, ctx, slots, positional))


def test_gradients_are_count_weighted_sums_at_the_slots():
    torch.manual_seed(6)
    C, L, M, D = 3, 6, 3, 4
    base = torch.randn(C, L, D, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(M, D, dtype=torch.float64, requires_grad=True)
    positional = torch.randn(L, D, dtype=torch.float64, requires_grad=True)
    slots = torch.tensor([
        [-1, 0, 1, 2, -1, -1],
        [-1, 0, 0, -1, 2, -1],  # vector 0 used twice in this class, vector 1 never
        [2, -1, -1, -1, -1, 0],
    ])
    upstream = torch.randn(C, L, D, dtype=torch.float64)
    (assemble_prompts(base, ctx, slots, positional) * upstream).sum().backward()

    expected_ctx = torch.zeros(M, D, dtype=torch.float64)
    for c in range(C):
        for t in range(L):
            if slots[c, t] >= 0:
                expected_ctx[slots[c, t]] += upstream[c, t]
    assert torch.allclose(ctx.grad, expected_ctx)
    # vector 0 sits at 4 positions: once in class 0, twice in class 1, once in class 2
    assert torch.allclose(ctx.grad[0], upstream[0, 1] + upstream[1, 1] + upstream[1, 2] + upstream[2, 5])

    replaced = (slots >= 0)[..., None].expand(C, L, D)
    assert torch.equal(base.grad[replaced], torch.zeros_like(base.grad[replaced]))
    assert torch.equal(base.grad[~replaced], upstream[~replaced])
    assert torch.allclose(positional.grad, upstream.sum(0))


def test_gradients_per_image_ctx_sum_over_classes():
    torch.manual_seed(7)
    B, C, L, M, D = 2, 3, 5, 2, 3
    base = torch.randn(C, L, D, dtype=torch.float64)
    ctx = torch.randn(B, 1, M, D, dtype=torch.float64, requires_grad=True)
    slots = coop_slots(C, L, M)
    upstream = torch.randn(B, C, L, D, dtype=torch.float64)
    (assemble_prompts(base, ctx, slots) * upstream).sum().backward()
    expected = upstream[:, :, 1 : 1 + M].sum(1, keepdim=True)  # [B, 1, M, D]
    assert torch.allclose(ctx.grad, expected)


def test_simple_loss_gradient_by_hand():
    """sum of all prompt entries: d/dctx[j] = number of slots holding j."""
    C, L, M, D = 4, 5, 2, 3
    base = torch.zeros(C, L, D)
    ctx = torch.zeros(M, D, requires_grad=True)
    slots = torch.full((C, L), -1)
    slots[:, 1] = 0
    slots[:2, 2] = 1
    slots[0, 3] = 1
    assemble_prompts(base, ctx, slots).sum().backward()
    assert torch.equal(ctx.grad, torch.tensor([[4.0] * D, [3.0] * D]))


@FAST
@given(
    n_cls=st.integers(1, 4),
    length=st.integers(1, 6),
    m=st.integers(1, 3),
    dim=st.integers(1, 4),
    kind=st.sampled_from(["shared", "class", "image", "image_class"]),
    batch=st.integers(1, 3),
    with_pos=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    data=st.data(),
)
def test_assemble_matches_loop_property(n_cls, length, m, dim, kind, batch, with_pos, dtype, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    base = torch.randn(n_cls, length, dim, generator=g).to(dtype)
    lead = {"shared": (), "class": (n_cls,), "image": (batch, 1), "image_class": (batch, n_cls)}[kind]
    ctx = torch.randn(*lead, m, dim, generator=g).to(dtype)
    slots = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(-1, m - 1), min_size=length, max_size=length),
                           min_size=n_cls, max_size=n_cls))
    )
    positional = torch.randn(length + 1, dim, generator=g).to(dtype) if with_pos else None
    out = assemble_prompts(base, ctx, slots, positional)
    expected_lead = torch.broadcast_shapes(lead, (n_cls,))
    assert out.shape == (*expected_lead, length, dim)
    assert out.dtype == dtype
    assert torch.equal(out, naive_assemble(base, ctx, slots, positional))


@pytest.mark.parametrize(
    "base_shape, ctx_shape, slots_shape",
    [
        ((3, 5, 4), (2, 4), (3, 6)),  # slots length != L
        ((3, 5, 4), (2, 4), (2, 5)),  # slots classes != C
        ((3, 5, 4), (2, 3), (3, 5)),  # ctx width != D
    ],
)
def test_assemble_bad_shapes_raise_value_error(base_shape, ctx_shape, slots_shape):
    slots = torch.full(slots_shape, -1)
    with pytest.raises(ValueError):
        assemble_prompts(torch.zeros(base_shape), torch.zeros(ctx_shape), slots)


@pytest.mark.parametrize(
    "ctx_shape, slot_value",
    [
        ((2, 2, 4), 0),  # per-class ctx for 2 classes, base has 3: not broadcastable
        ((4,), 0),  # ctx without a context dim
        ((2, 4), 2),  # slot index 2 with only M=2 context vectors
    ],
    ids=["ctx-lead-not-broadcastable", "ctx-1d", "slot-out-of-range"],
)
def test_assemble_other_bad_inputs_raise_value_error(ctx_shape, slot_value):
    slots = torch.full((3, 5), -1)
    slots[:, 1] = slot_value
    with pytest.raises(ValueError):
        assemble_prompts(torch.zeros(3, 5, 4), torch.zeros(ctx_shape), slots)


# --------------------------------------------------------------- cosine_logits

IMAGE = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
TEXT = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
R = 100 / math.sqrt(2)


def test_cosine_logits_hand_values_shared_text():
    out = cosine_logits(IMAGE, TEXT, 100.0)
    expected = torch.tensor([[100.0, R, 0.0], [0.0, R, -100.0]])
    assert out.shape == (2, 3)
    assert torch.allclose(out, expected, atol=1e-4)


def test_cosine_logits_hand_values_per_image_text():
    text = torch.stack([TEXT, TEXT.flip(0)])  # image 1 sees the classes in reverse order
    out = cosine_logits(IMAGE, text, torch.tensor(100.0))
    expected = torch.tensor([[100.0, R, 0.0], [-100.0, R, 0.0]])
    assert out.shape == (2, 3)
    assert torch.allclose(out, expected, atol=1e-4)


def test_cosine_logits_scale_is_linear_and_norm_invariant():
    torch.manual_seed(8)
    img, txt = torch.randn(3, 5), torch.randn(4, 5)
    one = cosine_logits(img, txt, 1.0)
    assert torch.allclose(cosine_logits(img * 7.0, txt * 0.1, 50.0), 50.0 * one, atol=1e-4)
    assert one.abs().max() <= 1.0 + 1e-6


def test_cosine_logits_gradient_flows_to_text():
    torch.manual_seed(9)
    img = torch.randn(2, 3, dtype=torch.float64)
    txt = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cosine_logits(img, t, 10.0), (txt,))


TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10), torch.bfloat16: (2e-2, 2e-2)}


@FAST
@given(
    b=st.integers(1, 4),
    c=st.integers(1, 5),
    d=st.integers(1, 8),
    per_image=st.booleans(),
    scale=st.sampled_from([1.0, 14.3, 100.0]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cosine_logits_property(b, c, d, per_image, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    img = (torch.randn(b, d, generator=g) + 0.1).to(dtype)
    txt = (torch.randn(*((b,) if per_image else ()), c, d, generator=g) + 0.1).to(dtype)
    out = cosine_logits(img, txt, scale)
    assert out.shape == (b, c)
    assert out.dtype == dtype
    rtol, atol = TOL[dtype]
    # the naive result is computed in float64 from the (possibly rounded) inputs
    expected = naive_cosine(img, txt, scale)
    assert torch.allclose(out.double(), expected, rtol=rtol, atol=atol * scale), (out, expected)


@pytest.mark.parametrize(
    "img_shape, txt_shape",
    [((2, 8), (3, 7)), ((2, 8), (3, 4, 8)), ((8,), (3, 8)), ((2, 3, 8), (3, 8)), ((2, 8), (2, 1, 3, 8))],
    ids=["width-mismatch", "batch-mismatch", "image-1d", "image-3d", "text-4d"],
)
def test_cosine_logits_bad_shapes_raise_value_error(img_shape, txt_shape):
    with pytest.raises(ValueError):
        cosine_logits(torch.randn(img_shape), torch.randn(txt_shape), 100.0)
