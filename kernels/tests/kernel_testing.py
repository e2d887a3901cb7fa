"""Ground truth for the op suites: hand-built loops, per-dtype tolerances, budgets.

``VLPROMPT_KERNELS_STRESS=N`` multiplies every hypothesis example count by N
(CI runs N=1; ``N=20`` is a thorough local run).
"""

from __future__ import annotations

import itertools
import math
import os

import torch
from hypothesis import HealthCheck, Phase, settings

STRESS = max(int(os.environ.get("VLPROMPT_KERNELS_STRESS", "1") or 1), 1)


def examples(n: int) -> settings:
    """Hypothesis settings: ``n`` examples (times the stress factor), no deadline, and
    the per-test backend fixture allowed (it is constant across examples). CI does not
    shrink a failing example (the interpreter makes that take minutes); it still
    prints it, and a stress run shrinks."""
    phases = tuple(Phase) if STRESS > 1 else tuple(p for p in Phase if p is not Phase.shrink)
    return settings(
        max_examples=n * STRESS,
        deadline=None,
        phases=phases,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# (rtol, atol) of cosine logits against float64 math on the same rounded inputs,
# atol in units of the logit scale. float32/float64 are a few ulps; bfloat16 and
# float16 allow for the reference rounding its normalised copies and its scaled
# image to the dtype before the product (the Triton kernels round once, at the end).
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}

# unit roundoff: a sum of n terms rounded after every step is within about
# n * u * sum(|terms|) of the exact sum (recursive summation bound)
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

# (rtol, atol) of gradients against float64 gradients, atol relative to the
# largest float64 gradient entry.
GRAD_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close_to(actual: torch.Tensor, expected64: torch.Tensor, tol, scale=1.0, what: str = ""):
    """``|actual - expected| <= atol*scale + rtol*|expected|`` elementwise (``scale``: a number
    or a tensor of per-entry scales), with a useful message."""
    rtol, atol = tol
    actual = actual.detach().double().cpu()
    expected64 = expected64.detach().double().cpu()
    assert actual.shape == expected64.shape, (what, actual.shape, expected64.shape)
    err = (actual - expected64).abs()
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().double().cpu()
    bound = atol * scale + rtol * expected64.abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.numel()} entries off; worst error {float(err.max()):.3g} "
        f"(bound there {float(bound.flatten()[err.flatten().argmax()]):.3g})"
    )


def naive_assemble(base, ctx, slots, positional=None):
    """One element at a time: ``out[*s, c, t] = ctx[*s', c', slots[c, t]]`` or ``base[c, t]``.

    ``s'``/``c'`` index ctx's leading dims, using 0 wherever ctx has size 1 (or
    lacks the dim), i.e. broadcasting written out by hand.
    """
    base, ctx, slots = base.cpu(), ctx.detach().cpu(), slots.cpu()
    positional = positional.cpu() if positional is not None else None
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


def naive_assemble_ctx_grad(ctx_shape, n_cls, slots, upstream):
    """float64 ``d sum(out * upstream) / d ctx`` by looping over every output row, and
    per entry the number of terms and the sum of their magnitudes (for error bounds)."""
    slots, upstream = slots.cpu(), upstream.detach().double().cpu()
    ctx_lead = tuple(ctx_shape[:-2])
    lead = upstream.shape[:-2]
    grad = torch.zeros(ctx_shape, dtype=torch.float64)
    terms = torch.zeros(ctx_shape[:-1], dtype=torch.float64)
    magnitude = torch.zeros(ctx_shape, dtype=torch.float64)
    for idx in itertools.product(*[range(n) for n in lead]):
        c = idx[-1]
        sub = idx[len(idx) - len(ctx_lead):] if ctx_lead else ()
        sub = tuple(0 if size == 1 else i for i, size in zip(sub, ctx_lead))
        for t in range(slots.shape[1]):
            j = int(slots[c, t])
            if j >= 0:
                grad[sub + (j,)] += upstream[idx + (t,)]
                magnitude[sub + (j,)] += upstream[idx + (t,)].abs()
                terms[sub + (j,)] += 1
    return grad, terms, magnitude


def naive_cosine(image, text, scale):
    """float64 ``scale * cos(image_b, text_(b)c)`` with explicit loops."""
    image = image.detach().double().cpu()
    text = text.detach().double().cpu()
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


def cosine_grad_scales(image, text, scale, upstream):
    """Per-row magnitudes of the terms the cosine gradients are sums of, in float64.

    ``dx_b = s/|x_b| sum_c G_bc (v_c - cos_bc u_b)`` has terms of size at most
    ``2 s |G_bc| / |x_b|``; the text rows likewise. Gradients can cancel to ~0 (D = 1,
    parallel vectors), so errors are bounded relative to these, broadcast to the
    gradients' shapes, not relative to the result.
    """
    x, t, g = (a.detach().double().cpu() for a in (image, text, upstream))
    s = abs(float(scale))
    nx = x.norm(dim=-1).clamp_min(1e-12)
    nt = t.norm(dim=-1).clamp_min(1e-12)
    gx = 2 * s * g.abs().sum(1) / nx  # [B]
    if t.dim() == 3:
        gt = 2 * s * g.abs() / nt  # [B, C]
    else:
        gt = 2 * s * g.abs().sum(0) / nt  # [C]
    return gx[:, None].expand_as(x), gt[..., None].expand_as(t)
