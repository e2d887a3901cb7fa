"""The Triton kernels against the PyTorch reference, forward and backward.

Runs in Triton's interpreter on the CPU (CI) and compiled on CUDA (``cuda``
marker). Shapes cross the kernels' block sizes (16/32 rows, 32/64/256 features)
so that masked tails and multi-block loops are exercised; the reference,
evaluated in float64 on the same rounded inputs, is the ground truth, with the
float32/bfloat16/float16 reference itself also shown to sit within the same
bounds where that is informative.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_testing import GRAD_TOL, TOL, UNIT, assert_close_to, coop_slots, cosine_grad_scales, examples
from vlprompt_kernels import assemble_prompts, cosine_logits, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grads64(fn, inputs, upstream, wrt):
    """float64 reference outputs and gradients w.r.t. ``inputs[i]`` for i in wrt."""
    inputs64 = [x.detach().double().cpu() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                for x in inputs]
    for i in wrt:
        inputs64[i].requires_grad_(True)
    out = fn(*inputs64)
    grads = torch.autograd.grad(out, [inputs64[i] for i in wrt], upstream.double().cpu())
    return out.detach(), grads


# ------------------------------------------------------------------ assembly

LAYOUTS = {
    "shared": lambda b, c: (),
    "class": lambda b, c: (c,),
    "image": lambda b, c: (b, 1),
    "image_class": lambda b, c: (b, c),
    "samples": lambda b, c: (2, b, 1),
    "one": lambda b, c: (1,),
}


@examples(20)
@given(
    n_cls=st.integers(1, 12),
    length=st.integers(1, 20),
    m=st.integers(1, 6),
    dim=st.integers(1, 300),
    kind=st.sampled_from(sorted(LAYOUTS)),
    batch=st.integers(1, 3),
    with_pos=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_assemble_matches_reference(triton_backend, n_cls, length, m, dim, kind, batch, with_pos, dtype, seed):
    dev = triton_backend.device
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_cls, length, dim, generator=g).to(dtype)
    ctx = torch.randn(*LAYOUTS[kind](batch, n_cls), m, dim, generator=g).to(dtype)
    slots = torch.randint(-1, m, (n_cls, length), generator=g)
    positional = torch.randn(length + 2, dim, generator=g).to(dtype) if with_pos else None

    expected = reference.assemble_prompts(base, ctx, slots, positional)
    ctx_d = ctx.to(dev).requires_grad_(True)
    out = assemble_prompts(base.to(dev), ctx_d, slots.to(dev), positional.to(dev) if with_pos else None)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.equal(out.detach().cpu(), expected)  # a copy and one addition: bit-identical

    upstream = torch.randn(out.shape, generator=g).to(dtype)
    (grad,) = torch.autograd.grad(out, ctx_d, upstream.to(dev))
    _, (grad64,) = _grads64(reference.assemble_prompts, (base, ctx, slots, positional), upstream, [1])
    # the kernel sums in float32 and rounds once; bound the float32 sum's error by the
    # recursive-summation bound and add half an ulp of the dtype for the final rounding
    _, (magnitude,) = _grads64(reference.assemble_prompts, (base, ctx, slots, positional), upstream.abs(), [1])
    terms = n_cls * length  # at most this many slots feed one context entry
    bound = (UNIT[torch.float32] * terms + UNIT[dtype]) * magnitude
    assert_close_to(grad, grad64, (0.0, 1.0), scale=bound, what="ctx grad")


def test_assemble_mixed_dtypes_promote_like_the_reference(triton_backend):
    dev = triton_backend.device
    torch.manual_seed(20)
    C, L, M, D = 3, 6, 2, 40
    base = torch.randn(C, L, D).bfloat16()
    ctx = torch.randn(2, 1, M, D)  # float32 context, bfloat16 base
    positional = torch.randn(L, D).half()
    slots = coop_slots(C, L, M, start=2)
    expected = reference.assemble_prompts(base, ctx, slots, positional)
    out = assemble_prompts(base.to(dev), ctx.to(dev), slots.to(dev), positional.to(dev))
    assert out.dtype == expected.dtype == torch.float32
    assert torch.equal(out.cpu(), expected)


def test_assemble_frozen_inputs_get_the_reference_gradients_too(triton_backend):
    """Methods freeze base and positional; if a caller does not, their gradients still match."""
    dev = triton_backend.device
    torch.manual_seed(21)
    C, L, M, D = 4, 7, 3, 33
    base, ctx, positional = torch.randn(C, L, D), torch.randn(2, 1, M, D), torch.randn(L + 3, D)
    slots = torch.randint(-1, M, (C, L), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    upstream = torch.randn(2, C, L, D)
    inputs = [t.to(dev).requires_grad_(True) for t in (base, ctx, positional)]
    out = assemble_prompts(inputs[0], inputs[1], slots.to(dev), inputs[2])
    grads = torch.autograd.grad(out, inputs, upstream.to(dev))
    _, expected = _grads64(reference.assemble_prompts, (base, ctx, slots.long(), positional), upstream, [0, 1, 3])
    for got, want, name in zip(grads, expected, ("base", "ctx", "positional")):
        assert got.shape == want.shape
        assert_close_to(got, want, GRAD_TOL[torch.float32], scale=float(want.abs().max()), what=name)


def test_assemble_non_contiguous_ctx_and_no_grad(triton_backend):
    dev = triton_backend.device
    torch.manual_seed(22)
    C, L, M, D = 3, 5, 2, 20
    base = torch.randn(C, L, D, device=dev)
    ctx = torch.randn(D, M, device=dev).t()  # [M, D], transposed storage
    slots = coop_slots(C, L, M).to(dev)
    with torch.no_grad():
        out = assemble_prompts(base, ctx, slots)
    assert not out.requires_grad
    assert torch.equal(out.cpu(), reference.assemble_prompts(base.cpu(), ctx.cpu(), slots.cpu()))


@pytest.mark.parametrize("n_cls, length, dim", [(0, 5, 4), (3, 0, 4), (3, 5, 0)], ids=["no-classes", "L0", "D0"])
def test_assemble_empty_shapes(triton_backend, n_cls, length, dim):
    dev = triton_backend.device
    base = torch.randn(n_cls, length, dim, device=dev)
    ctx = torch.randn(2, dim, device=dev, requires_grad=True)
    slots = torch.full((n_cls, length), -1, device=dev)
    out = assemble_prompts(base, ctx, slots)
    assert out.shape == (n_cls, length, dim)
    out.sum().backward()
    assert torch.equal(ctx.grad, torch.zeros_like(ctx))


# ------------------------------------------------------------- cosine logits


@examples(20)
@given(
    b=st.integers(1, 40),
    c=st.integers(1, 40),
    d=st.integers(1, 80),
    per_image=st.booleans(),
    scale=st.sampled_from([1.0, 14.3, 100.0]),
    scale_kind=st.sampled_from(["float", "tensor", "learned"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_cosine_matches_reference(triton_backend, b, c, d, per_image, scale, scale_kind, dtype, seed):
    dev = triton_backend.device
    g = torch.Generator().manual_seed(seed)
    img = (torch.randn(b, d, generator=g) + 0.1).to(dtype)
    txt = (torch.randn(*((b,) if per_image else ()), c, d, generator=g) + 0.1).to(dtype)
    s = scale if scale_kind == "float" else torch.tensor(scale, requires_grad=scale_kind == "learned")
    upstream = torch.randn(b, c, generator=g).to(dtype)

    img_d, txt_d = img.to(dev).requires_grad_(True), txt.to(dev).requires_grad_(True)
    out = cosine_logits(img_d, txt_d, s)
    assert out.shape == (b, c) and out.dtype == dtype
    wrt = [img_d, txt_d] + ([s] if scale_kind == "learned" else [])
    grads = torch.autograd.grad(out, wrt, upstream.to(dev))

    expected, expected_grads = _grads64(reference.cosine_logits, (img, txt, s), upstream, range(len(wrt)))
    assert_close_to(out, expected, TOL[dtype], scale=scale, what="logits")
    scales = cosine_grad_scales(img, txt, scale, upstream) + (float(upstream.double().abs().sum()),)
    for got, want, x, sc, name in zip(grads, expected_grads, wrt, scales, ("image grad", "text grad", "scale grad")):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_close_to(got, want, GRAD_TOL[dtype], scale=sc, what=name)
    # the kernel is at least as accurate as the reference in the same dtype
    ref_err = (reference.cosine_logits(img, txt, s).double() - expected).abs().max()
    assert (out.detach().double().cpu() - expected).abs().max() <= ref_err + 4 * UNIT[dtype] * scale


def test_cosine_gradient_dtypes_and_devices(triton_backend):
    dev = triton_backend.device
    img = torch.randn(3, 20, device=dev).bfloat16().requires_grad_(True)
    txt = torch.randn(5, 20, device=dev).bfloat16().requires_grad_(True)
    scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)  # 0-dim, on the CPU
    gi, gt, gs = torch.autograd.grad(cosine_logits(img, txt, scale).float().sum(), (img, txt, scale))
    assert gi.dtype == gt.dtype == torch.bfloat16 and gi.device == img.device
    assert gs.dtype == torch.float64 and gs.device == scale.device and gs.shape == ()


def test_cosine_broadcast_upstream_and_non_contiguous_inputs(triton_backend):
    """``logits.sum().backward()`` hands the kernel a stride-0 gradient; views are accepted."""
    dev = triton_backend.device
    torch.manual_seed(23)
    img = torch.randn(70, 6, device=dev)[::2]  # [35, 6], row stride 12
    txt = torch.randn(6, 33, device=dev).t()  # [33, 6], column-major
    img.requires_grad_(True), txt.requires_grad_(True)
    gi, gt = torch.autograd.grad(cosine_logits(img, txt, 50.0).sum(), (img, txt))
    _, (ei, et) = _grads64(reference.cosine_logits, (img, txt, 50.0), torch.ones(35, 33), [0, 1])
    assert_close_to(gi, ei, GRAD_TOL[torch.float32], scale=float(ei.abs().max()), what="image grad")
    assert_close_to(gt, et, GRAD_TOL[torch.float32], scale=float(et.abs().max()), what="text grad")


@pytest.mark.parametrize("per_image", [False, True], ids=["shared-text", "per-image-text"])
def test_cosine_zero_vectors_follow_normalize_eps(triton_backend, per_image):
    """A zero feature row gives logit 0 and the ``x / eps`` gradient branch of F.normalize."""
    dev = triton_backend.device
    torch.manual_seed(24)
    img = torch.randn(3, 8)
    img[1] = 0
    txt = torch.randn(*((3,) if per_image else ()), 4, 8)
    txt[..., 2, :] = 0
    upstream = torch.randn(3, 4)
    img_d, txt_d = img.to(dev).requires_grad_(True), txt.to(dev).requires_grad_(True)
    out = cosine_logits(img_d, txt_d, 10.0)
    gi, gt = torch.autograd.grad(out, (img_d, txt_d), upstream.to(dev))
    expected, (ei, et) = _grads64(reference.cosine_logits, (img, txt, 10.0), upstream, [0, 1])
    assert torch.equal(out[1].cpu(), torch.zeros(4)) and torch.equal(out[:, 2].cpu(), torch.zeros(3))
    assert_close_to(out, expected, TOL[torch.float32], scale=10.0, what="logits")
    # gradients at zero rows are O(1/eps) = 1e12: compare relative to each tensor's largest entry
    assert float(ei[1].abs().max()) > 1e10
    assert_close_to(gi, ei, GRAD_TOL[torch.float32], scale=float(ei.abs().max()), what="image grad")
    assert_close_to(gt, et, GRAD_TOL[torch.float32], scale=float(et.abs().max()), what="text grad")


def test_cosine_inference_saves_nothing(triton_backend):
    dev = triton_backend.device
    img, txt = torch.randn(4, 8, device=dev), torch.randn(5, 8, device=dev)
    out = cosine_logits(img, txt, 100.0)
    assert out.grad_fn is None
    with torch.no_grad():
        again = cosine_logits(img.requires_grad_(True), txt, 100.0)
    assert again.grad_fn is None and torch.equal(out, again)


@pytest.mark.parametrize("b, c, d", [(0, 4, 8), (3, 0, 8), (3, 4, 0)], ids=["B0", "C0", "D0"])
@pytest.mark.parametrize("per_image", [False, True], ids=["shared-text", "per-image-text"])
def test_cosine_empty_shapes(triton_backend, b, c, d, per_image):
    dev = triton_backend.device
    img = torch.randn(b, d, device=dev, requires_grad=True)
    txt = torch.randn(*((b,) if per_image else ()), c, d, device=dev, requires_grad=True)
    out = cosine_logits(img, txt, 10.0)
    expected = reference.cosine_logits(img.detach().cpu(), txt.detach().cpu(), 10.0)
    assert out.shape == expected.shape and torch.equal(out.detach().cpu(), expected)
    gi, gt = torch.autograd.grad(out.sum(), (img, txt), allow_unused=True)
    assert torch.equal(gi, torch.zeros_like(img)) and torch.equal(gt, torch.zeros_like(txt))


def test_tensors_on_different_devices_are_an_error_not_a_crash(triton_backend):
    """Kernels read raw pointers: a tensor on another device must be refused before any launch."""
    dev = triton_backend.device
    base, ctx = torch.randn(2, 4, 8, device=dev), torch.randn(1, 8, device=dev)
    slots = coop_slots(2, 4, 1).to(dev)
    with pytest.raises(ValueError, match="different devices"):
        assemble_prompts(base, ctx, slots, torch.randn(4, 8, device="meta"))
    with pytest.raises(ValueError, match="different devices"):
        cosine_logits(torch.randn(2, 8, device=dev), torch.randn(3, 8, device="meta"), 10.0)
