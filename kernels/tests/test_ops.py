"""Every backend of the two ops against hand-built loops and hand-computed values.

The suite runs once per backend (``backend`` fixture, see ``conftest.py``): the
PyTorch reference, the Triton kernels in the interpreter, and both again on CUDA
where there is a GPU. Checks are element by element against loops written out
by hand, never a backend against itself; prompt assembly is a pure copy plus one
addition, so it must be bit-identical to the loop on every backend and dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_testing import (
    GRAD_TOL,
    TOL,
    UNIT,
    assert_close_to,
    coop_slots,
    examples,
    naive_assemble,
    naive_assemble_ctx_grad,
    naive_cosine,
)
from vlprompt_kernels import assemble_prompts, cosine_logits


def on(backend, *tensors):
    out = tuple(t.to(backend.device) if t is not None else None for t in tensors)
    return out if len(out) > 1 else out[0]


# ------------------------------------------------------------- assemble_prompts


def test_shared_ctx_equals_concatenation(backend):
    torch.manual_seed(0)
    C, L, M, D = 3, 9, 4, 5
    base, ctx = on(backend, torch.randn(C, L, D), torch.randn(M, D))
    out = assemble_prompts(base, ctx, coop_slots(C, L, M).to(backend.device))
    expected = torch.cat([base[:, :1], ctx.expand(C, M, D), base[:, 1 + M :]], dim=1)
    assert out.shape == (C, L, D)
    assert torch.equal(out, expected)


def test_shared_ctx_matches_loop_with_irregular_slots(backend):
    torch.manual_seed(1)
    C, L, M, D = 3, 7, 3, 4
    base, ctx = on(backend, torch.randn(C, L, D), torch.randn(M, D))
    # each class puts the context somewhere else; class 2 reuses vector 0 twice
    slots = torch.tensor([
        [-1, 0, 1, 2, -1, -1, -1],
        [-1, -1, -1, 0, 1, 2, -1],
        [0, -1, 2, -1, 0, 1, -1],
    ], device=backend.device)
    out = assemble_prompts(base, ctx, slots)
    assert torch.equal(out.cpu(), naive_assemble(base, ctx, slots))
    # positions marked -1 keep the base embedding, bit for bit
    keep = slots < 0
    assert torch.equal(out[keep], base[keep])
    assert torch.equal(out[2, 4], ctx[0]) and torch.equal(out[2, 0], ctx[0])


def test_per_class_ctx(backend):
    torch.manual_seed(2)
    C, L, M, D = 4, 8, 3, 5
    base, ctx = on(backend, torch.randn(C, L, D), torch.randn(C, M, D))
    slots = coop_slots(C, L, M, start=2).to(backend.device)
    out = assemble_prompts(base, ctx, slots)
    assert out.shape == (C, L, D)
    assert torch.equal(out.cpu(), naive_assemble(base, ctx, slots))
    for c in range(C):
        assert torch.equal(out[c, 2 : 2 + M], ctx[c])
        assert torch.equal(out[c, :2], base[c, :2])
        assert torch.equal(out[c, 2 + M :], base[c, 2 + M :])


def test_per_image_ctx_broadcasts_to_batch_and_classes(backend):
    torch.manual_seed(3)
    B, C, L, M, D = 2, 3, 7, 2, 4
    base, ctx = on(backend, torch.randn(C, L, D), torch.randn(B, 1, M, D))
    slots = coop_slots(C, L, M).to(backend.device)
    out = assemble_prompts(base, ctx, slots)
    assert out.shape == (B, C, L, D)
    assert torch.equal(out.cpu(), naive_assemble(base, ctx, slots))
    for b in range(B):
        for c in range(C):
            assert torch.equal(out[b, c, 1 : 1 + M], ctx[b, 0])
            assert torch.equal(out[b, c, 0], base[c, 0])


def test_per_image_and_class_ctx(backend):
    torch.manual_seed(4)
    B, C, L, M, D = 2, 3, 6, 2, 3
    base, ctx = on(backend, torch.randn(C, L, D), torch.randn(B, C, M, D))
    slots = coop_slots(C, L, M, start=3).to(backend.device)
    out = assemble_prompts(base, ctx, slots)
    assert out.shape == (B, C, L, D)
    assert torch.equal(out.cpu(), naive_assemble(base, ctx, slots))
    assert torch.equal(out[1, 2, 3:5], ctx[1, 2])
    assert not torch.equal(out[0, 2, 3:5], out[1, 2, 3:5])


def test_samples_per_image_ctx_keeps_every_leading_dim(backend):
    """``(K, B, 1)``: K Monte-Carlo context samples per image (BPL-style)."""
    torch.manual_seed(14)
    K, B, C, L, M, D = 3, 2, 4, 6, 2, 5
    base, ctx = on(backend, torch.randn(C, L, D), torch.randn(K, B, 1, M, D))
    slots = coop_slots(C, L, M, start=2).to(backend.device)
    out = assemble_prompts(base, ctx, slots)
    assert out.shape == (K, B, C, L, D)
    assert torch.equal(out.cpu(), naive_assemble(base, ctx, slots))
    assert torch.equal(out[2, 1, 3, 2:4], ctx[2, 1, 0])


def test_positional_embedding_is_added_to_every_position(backend):
    torch.manual_seed(5)
    C, L, M, D = 2, 5, 2, 3
    base, ctx = on(backend, torch.randn(C, L, D), torch.randn(M, D))
    positional = torch.randn(L + 4, D, device=backend.device)  # longer than L: only the first L rows are used
    slots = coop_slots(C, L, M).to(backend.device)
    out = assemble_prompts(base, ctx, slots, positional)
    without = assemble_prompts(base, ctx, slots)
    assert torch.equal(out, without + positional[:L])
    assert torch.equal(out.cpu(), naive_assemble(base, ctx, slots, positional))


def test_gradients_are_count_weighted_sums_at_the_slots(backend):
    torch.manual_seed(6)
    dt = backend.grad_dtype
    rtol, atol = GRAD_TOL[dt]
    C, L, M, D = 3, 6, 3, 4
    base = torch.randn(C, L, D, dtype=dt, device=backend.device, requires_grad=True)
    ctx = torch.randn(M, D, dtype=dt, device=backend.device, requires_grad=True)
    positional = torch.randn(L, D, dtype=dt, device=backend.device, requires_grad=True)
    slots = torch.tensor([
        [-1, 0, 1, 2, -1, -1],
        [-1, 0, 0, -1, 2, -1],  # vector 0 used twice in this class, vector 1 never
        [2, -1, -1, -1, -1, 0],
    ], device=backend.device)
    upstream = torch.randn(C, L, D, dtype=dt, device=backend.device)
    (assemble_prompts(base, ctx, slots, positional) * upstream).sum().backward()

    expected_ctx = torch.zeros(M, D, dtype=dt, device=backend.device)
    for c in range(C):
        for t in range(L):
            if slots[c, t] >= 0:
                expected_ctx[slots[c, t]] += upstream[c, t]
    assert torch.allclose(ctx.grad, expected_ctx, rtol=rtol, atol=atol)
    # vector 0 sits at 4 positions: once in class 0, twice in class 1, once in class 2
    expected_0 = upstream[0, 1] + upstream[1, 1] + upstream[1, 2] + upstream[2, 5]
    assert torch.allclose(ctx.grad[0], expected_0, rtol=rtol, atol=atol)
    assert torch.equal(ctx.grad[1], upstream[0, 2])  # vector 1 sits at one position only: a plain copy

    replaced = (slots >= 0)[..., None].expand(C, L, D)
    assert torch.equal(base.grad[replaced], torch.zeros_like(base.grad[replaced]))
    assert torch.equal(base.grad[~replaced], upstream[~replaced])
    assert torch.allclose(positional.grad, upstream.sum(0), rtol=rtol, atol=atol)


def test_gradients_per_image_ctx_sum_over_classes(backend):
    torch.manual_seed(7)
    dt = backend.grad_dtype
    B, C, L, M, D = 2, 3, 5, 2, 3
    base = torch.randn(C, L, D, dtype=dt, device=backend.device)
    ctx = torch.randn(B, 1, M, D, dtype=dt, device=backend.device, requires_grad=True)
    slots = coop_slots(C, L, M).to(backend.device)
    upstream = torch.randn(B, C, L, D, dtype=dt, device=backend.device)
    (assemble_prompts(base, ctx, slots) * upstream).sum().backward()
    expected = upstream[:, :, 1 : 1 + M].sum(1, keepdim=True)  # [B, 1, M, D]
    rtol, atol = GRAD_TOL[dt]
    assert torch.allclose(ctx.grad, expected, rtol=rtol, atol=atol)


def test_gradients_per_image_and_class_ctx_are_not_reduced(backend):
    torch.manual_seed(17)
    dt = backend.grad_dtype
    B, C, L, M, D = 2, 3, 6, 2, 4
    base = torch.randn(C, L, D, dtype=dt, device=backend.device)
    ctx = torch.randn(B, C, M, D, dtype=dt, device=backend.device, requires_grad=True)
    slots = coop_slots(C, L, M, start=2).to(backend.device)
    upstream = torch.randn(B, C, L, D, dtype=dt, device=backend.device)
    (assemble_prompts(base, ctx, slots) * upstream).sum().backward()
    assert torch.equal(ctx.grad, upstream[:, :, 2:4])  # one slot per (image, class, vector): a plain copy


def test_simple_loss_gradient_by_hand(backend):
    """sum of all prompt entries: d/dctx[j] = number of slots holding j."""
    C, L, M, D = 4, 5, 2, 3
    base = torch.zeros(C, L, D, device=backend.device)
    ctx = torch.zeros(M, D, device=backend.device, requires_grad=True)
    slots = torch.full((C, L), -1, device=backend.device)
    slots[:, 1] = 0
    slots[:2, 2] = 1
    slots[0, 3] = 1
    assemble_prompts(base, ctx, slots).sum().backward()
    assert torch.equal(ctx.grad.cpu(), torch.tensor([[4.0] * D, [3.0] * D]))


LAYOUTS = {"shared": lambda b, c: (), "class": lambda b, c: (c,), "image": lambda b, c: (b, 1),
           "image_class": lambda b, c: (b, c), "samples": lambda b, c: (2, b, 1)}


@examples(25)
@given(
    n_cls=st.integers(1, 4),
    length=st.integers(1, 6),
    m=st.integers(1, 3),
    dim=st.integers(1, 4),
    kind=st.sampled_from(sorted(LAYOUTS)),
    batch=st.integers(1, 3),
    with_pos=st.booleans(),
    data=st.data(),
)
def test_assemble_matches_loop_property(backend, n_cls, length, m, dim, kind, batch, with_pos, data):
    dtype = data.draw(st.sampled_from(backend.dtypes), label="dtype")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    base = torch.randn(n_cls, length, dim, generator=g).to(dtype)
    lead = LAYOUTS[kind](batch, n_cls)
    ctx = torch.randn(*lead, m, dim, generator=g).to(dtype)
    slots = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(-1, m - 1), min_size=length, max_size=length),
                           min_size=n_cls, max_size=n_cls))
    )
    positional = torch.randn(length + 1, dim, generator=g).to(dtype) if with_pos else None
    ctx.requires_grad_(True)
    out = assemble_prompts(*on(backend, base, ctx, slots, positional))
    expected_lead = torch.broadcast_shapes(lead, (n_cls,))
    assert out.shape == (*expected_lead, length, dim)
    assert out.dtype == dtype
    assert torch.equal(out.detach().cpu(), naive_assemble(base, ctx, slots, positional))

    upstream = torch.randn(out.shape, generator=g).to(dtype)
    (grad,) = torch.autograd.grad(out, ctx, upstream.to(backend.device))
    assert grad.shape == ctx.shape and grad.dtype == dtype
    expected, terms, magnitude = naive_assemble_ctx_grad(ctx.shape, n_cls, slots, upstream)
    # recursive-summation bound: (terms + 1) roundings of at most u * sum|terms| each
    bound = UNIT[dtype] * (terms + 1)[..., None] * magnitude
    assert_close_to(grad, expected, (0.0, 1.0), scale=bound, what="ctx grad")


@pytest.mark.parametrize(
    "base_shape, ctx_shape, slots_shape",
    [
        ((3, 5, 4), (2, 4), (3, 6)),  # slots length != L
        ((3, 5, 4), (2, 4), (2, 5)),  # slots classes != C
        ((3, 5, 4), (2, 3), (3, 5)),  # ctx width != D
    ],
)
def test_assemble_bad_shapes_raise_value_error(backend, base_shape, ctx_shape, slots_shape):
    slots = torch.full(slots_shape, -1, device=backend.device)
    with pytest.raises(ValueError):
        assemble_prompts(*on(backend, torch.zeros(base_shape), torch.zeros(ctx_shape)), slots)


@pytest.mark.parametrize(
    "ctx_shape, slot_value",
    [
        ((2, 2, 4), 0),  # per-class ctx for 2 classes, base has 3: not broadcastable
        ((4,), 0),  # ctx without a context dim
        ((2, 4), 2),  # slot index 2 with only M=2 context vectors
    ],
    ids=["ctx-lead-not-broadcastable", "ctx-1d", "slot-out-of-range"],
)
def test_assemble_other_bad_inputs_raise_value_error(backend, ctx_shape, slot_value):
    slots = torch.full((3, 5), -1, device=backend.device)
    slots[:, 1] = slot_value
    with pytest.raises(ValueError):
        assemble_prompts(*on(backend, torch.zeros(3, 5, 4), torch.zeros(ctx_shape)), slots)


# --------------------------------------------------------------- cosine_logits

IMAGE = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
TEXT = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
R = 100 / math.sqrt(2)


def test_cosine_logits_hand_values_shared_text(backend):
    out = cosine_logits(*on(backend, IMAGE, TEXT), 100.0)
    expected = torch.tensor([[100.0, R, 0.0], [0.0, R, -100.0]])
    assert out.shape == (2, 3)
    assert torch.allclose(out.cpu(), expected, atol=1e-4)


def test_cosine_logits_hand_values_per_image_text(backend):
    text = torch.stack([TEXT, TEXT.flip(0)])  # image 1 sees the classes in reverse order
    out = cosine_logits(*on(backend, IMAGE, text), torch.tensor(100.0))
    expected = torch.tensor([[100.0, R, 0.0], [-100.0, R, 0.0]])
    assert out.shape == (2, 3)
    assert torch.allclose(out.cpu(), expected, atol=1e-4)


def test_cosine_logits_scale_is_linear_and_norm_invariant(backend):
    torch.manual_seed(8)
    img, txt = on(backend, torch.randn(3, 5), torch.randn(4, 5))
    one = cosine_logits(img, txt, 1.0)
    assert torch.allclose(cosine_logits(img * 7.0, txt * 0.1, 50.0), 50.0 * one, atol=1e-4)
    assert one.abs().max() <= 1.0 + 1e-6


def naive_cosine_grads(image, text, scale, upstream):
    """float64 gradients of ``sum(upstream * logits)`` written out per row:
    ``dx_b = s/|x_b| sum_c G_bc (v_c - cos_bc u_b)``, ``dt_c = s/|t_c| sum_b G_bc (u_b - cos_bc v_c)``
    (``u``, ``v`` the unit vectors; per-image text pairs each ``t_bc`` with image b only)."""
    x, t, g = (a.detach().double().cpu() for a in (image, text, upstream))
    per_image = t.dim() == 3
    dx, dt = torch.zeros_like(x), torch.zeros_like(t)
    for b in range(x.shape[0]):
        nx = float(x[b].norm())
        u = x[b] / nx
        for c in range(g.shape[1]):
            tc = t[b, c] if per_image else t[c]
            nt = float(tc.norm())
            v = tc / nt
            cos = float(u @ v)
            dx[b] += scale * float(g[b, c]) / nx * (v - cos * u)
            grad_t = scale * float(g[b, c]) / nt * (u - cos * v)
            if per_image:
                dt[b, c] += grad_t
            else:
                dt[c] += grad_t
    return dx, dt


@pytest.mark.parametrize("per_image", [False, True], ids=["shared-text", "per-image-text"])
def test_cosine_logits_gradients_by_hand(backend, per_image):
    torch.manual_seed(9)
    dt = backend.grad_dtype
    B, C, D, scale = 3, 4, 5, 14.3
    img = torch.randn(B, D, dtype=dt)
    txt = torch.randn(*((B,) if per_image else ()), C, D, dtype=dt)
    upstream = torch.randn(B, C, dtype=dt)
    img_d, txt_d = (a.to(backend.device).requires_grad_() for a in (img, txt))
    gx, gt = torch.autograd.grad(cosine_logits(img_d, txt_d, scale), (img_d, txt_d), upstream.to(backend.device))
    ex, et = naive_cosine_grads(img, txt, scale, upstream)
    tol = GRAD_TOL[dt]
    assert_close_to(gx, ex, tol, scale=float(ex.abs().max()), what="image grad")
    assert_close_to(gt, et, tol, scale=float(et.abs().max()), what="text grad")


def test_cosine_logits_gradcheck(backend):
    if torch.float64 not in backend.dtypes:
        pytest.skip(f"{backend} has no float64 path (gradients are checked against the loops above)")
    torch.manual_seed(9)
    img = torch.randn(2, 3, dtype=torch.float64, device=backend.device)
    txt = torch.randn(4, 3, dtype=torch.float64, device=backend.device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cosine_logits(img, t, 10.0), (txt,))


@examples(25)
@given(
    b=st.integers(1, 4),
    c=st.integers(1, 5),
    d=st.integers(1, 8),
    per_image=st.booleans(),
    scale=st.sampled_from([1.0, 14.3, 100.0]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_cosine_logits_property(backend, b, c, d, per_image, scale, seed, data):
    dtype = data.draw(st.sampled_from(backend.dtypes), label="dtype")
    g = torch.Generator().manual_seed(seed)
    img = (torch.randn(b, d, generator=g) + 0.1).to(dtype)
    txt = (torch.randn(*((b,) if per_image else ()), c, d, generator=g) + 0.1).to(dtype)
    out = cosine_logits(*on(backend, img, txt), scale)
    assert out.shape == (b, c)
    assert out.dtype == dtype
    # the naive result is computed in float64 from the (possibly rounded) inputs
    expected = naive_cosine(img, txt, scale)
    assert_close_to(out, expected, TOL[dtype], scale=scale, what="logits")


@pytest.mark.parametrize(
    "img_shape, txt_shape",
    [((2, 8), (3, 7)), ((2, 8), (3, 4, 8)), ((8,), (3, 8)), ((2, 3, 8), (3, 8)), ((2, 8), (2, 1, 3, 8))],
    ids=["width-mismatch", "batch-mismatch", "image-1d", "image-3d", "text-4d"],
)
def test_cosine_logits_bad_shapes_raise_value_error(backend, img_shape, txt_shape):
    with pytest.raises(ValueError):
        cosine_logits(*on(backend, torch.randn(img_shape), torch.randn(txt_shape)), 100.0)
