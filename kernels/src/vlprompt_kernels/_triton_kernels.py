"""Triton kernels behind :mod:`vlprompt_kernels.triton_backend` (definitions only).

Importing this module defines ``@triton.jit`` functions and launches nothing.
Every kernel loads its inputs in their own dtype, computes in float32 and rounds
once when it stores. Two interpreter pitfalls shape the code (both verified on
Triton 3.8 with ``TRITON_INTERPRET=1``):

* ``tl.dot`` on bfloat16 operands multiplies raw bit patterns in the interpreter
  (triton-lang/triton#11584), so operands are cast to float32 before every
  ``tl.dot``; with ``input_precision="ieee"`` the dot is a true float32 product
  on GPUs too (no TF32), which is what the float32 reference computes.
* the interpreter truncates float32 -> bfloat16 instead of rounding to nearest
  even, so bfloat16 outputs go through :func:`_round_bf16`, an integer RNE
  rounding identical to the hardware conversion (``cvt.rn.bf16.f32``). With it
  prompt assembly is bit-identical to the reference in every dtype, in the
  interpreter and on the GPU alike.
"""

from __future__ import annotations

import triton
import triton.language as tl

EPS = tl.constexpr(1e-12)  # F.normalize's default: x / max(||x||, eps)


@triton.jit
def _round_bf16(x):
    """float32 -> bfloat16, round to nearest even (NaN stays a quiet NaN of the same sign)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # noqa: PLR0124 -- x != x: NaN
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _cast_out(x, out_ptr, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        return _round_bf16(x)
    else:
        return x.to(out_ptr.dtype.element_ty)


# ------------------------------------------------------------------ assembly


@triton.jit
def assemble_fwd_kernel(
    base_ptr, ctx_ptr, slots_ptr, pos_ptr, out_ptr,
    N, CL, D,
    ctx_stride_n, ctx_stride_c, L,
    HAS_POS: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[n, c, t, :] = (ctx[n, c', slots[c, t]] if slots[c, t] >= 0 else base[c, t]) + pos[t]``.

    One program owns ``BLOCK_R`` consecutive ``(c, t)`` token rows (of ``CL = C*L``)
    by ``BLOCK_D`` features and loops over the ``N`` prompt copies (images,
    samples): base tokens and positional rows are read once and written N times,
    only context rows are read per copy (masked loads: a row reads its context
    vector or its base token, never both). So the traffic is the output written
    once plus the inputs read once, with no gathered or concatenated temporary:
    the per-image ``[N*C, L, D]`` prompts of CoCoOp cost one write.
    ``ctx`` is ``[N, C or 1, M, D]`` contiguous; ``ctx_stride_c`` is 0 when one
    context serves every class.
    """
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < CL
    d_ok = d < D
    t = r % L
    c = r // L
    slot = tl.load(slots_ptr + r, mask=r_ok, other=-1).to(tl.int64)
    from_ctx = slot >= 0
    m_ctx = (r_ok & from_ctx)[:, None] & d_ok[None, :]
    m_base = (r_ok & (slot < 0))[:, None] & d_ok[None, :]
    m_out = r_ok[:, None] & d_ok[None, :]
    v_base = tl.load(base_ptr + r[:, None] * D + d[None, :], mask=m_base, other=0.0).to(tl.float32)
    if HAS_POS:
        pos = tl.load(pos_ptr + t[:, None] * D + d[None, :], mask=m_out, other=0.0).to(tl.float32)
        v_base += pos
    ctx_off = (c * ctx_stride_c + slot * D)[:, None] + d[None, :]
    out_off = r[:, None] * D + d[None, :]
    for n in range(N):
        n64 = tl.cast(n, tl.int64)  # n * C*L*D passes 2**31 at research shapes
        v = tl.load(ctx_ptr + n64 * ctx_stride_n + ctx_off, mask=m_ctx, other=0.0).to(tl.float32)
        if HAS_POS:
            v += pos
        v = tl.where(from_ctx[:, None], v, v_base)
        tl.store(out_ptr + n64 * CL * D + out_off, _cast_out(v, out_ptr, OUT_BF16), mask=m_out)


@triton.jit
def assemble_bwd_kernel(
    grad_ptr, pos_idx_ptr, key_ptr_ptr, dctx_ptr,
    G, M, CLD, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, OUT_BF16: tl.constexpr,
):
    """``dctx[n, g, j] = sum of grad[n, c, t]`` over the ``(c, t)`` listed for key ``g*M + j``.

    The slot map is inverted once per call into CSR form (``key_ptr``: offsets
    per key, ``pos_idx``: flat ``c*L + t`` positions sorted by key), where the
    group ``g`` is the class for per-class contexts and 0 for contexts shared
    by all classes. One program owns one ``(n, g, j)`` context row and
    ``BLOCK_D`` features and walks its positions ``BLOCK_K`` at a time:
    a deterministic reduction with no atomics, reading each gradient row that
    lands in a slot exactly once (rows that keep the base token are never read).
    """
    pid = tl.program_id(0).to(tl.int64)  # = (n * G + g) * M + j
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    key = pid % (G * M)
    n = pid // (G * M)
    start = tl.load(key_ptr_ptr + key)
    end = tl.load(key_ptr_ptr + key + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < end
        pos = tl.load(pos_idx_ptr + k, mask=k_ok, other=0).to(tl.int64)
        rows = n * CLD + pos * D
        acc += tl.load(grad_ptr + rows[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(
            tl.float32
        )
    total = tl.sum(acc, axis=0)
    tl.store(dctx_ptr + pid * D + d, _cast_out(total, dctx_ptr, OUT_BF16), mask=d_ok)


# ------------------------------------------------------------- cosine logits


@triton.jit
def _load_scale(scale_ptr, scale_val, SCALE_PTR: tl.constexpr):
    if SCALE_PTR:
        return tl.load(scale_ptr).to(tl.float32)
    else:
        return scale_val


@triton.jit
def _inv_norm(nrm):
    """``1 / max(nrm, eps)`` and whether the norm exceeds eps (normalize's two branches)."""
    return tl.div_rn(1.0, tl.maximum(nrm, EPS)), nrm > EPS


@triton.jit
def cosine_fwd_shared_kernel(
    x_ptr, t_ptr, out_ptr, cos_ptr, nx_ptr, nt_ptr, scale_ptr, scale_val,
    B, C, D,
    stride_xb, stride_tc, stride_ob,
    SCALE_PTR: tl.constexpr, SAVE: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[b, c] = s * <x_b, t_c> / (max(|x_b|, eps) * max(|t_c|, eps))`` for text ``[C, D]``.

    A ``BLOCK_B x BLOCK_C`` output tile per program, a loop over D that feeds
    ``tl.dot`` and, from the same loaded tiles, the squared norms of its image
    and text rows: normalisation, product and scale in one pass, no normalised
    copies. With ``SAVE`` it also stores the float32 cosines and the raw norms
    for the backward (``[B, C] + [B] + [C]`` floats, 1/D of the inputs).
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rb = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rc = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    b_ok = rb < B
    c_ok = rc < C
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    sx = tl.zeros([BLOCK_B], dtype=tl.float32)
    st = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + rk
        k_ok = k < D
        x = tl.load(x_ptr + rb[:, None] * stride_xb + k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        t = tl.load(t_ptr + rc[:, None] * stride_tc + k[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        t = t.to(tl.float32)
        acc = tl.dot(x, tl.trans(t), acc, input_precision="ieee")
        sx += tl.sum(x * x, axis=1)
        st += tl.sum(t * t, axis=1)
    nx = tl.sqrt_rn(sx)
    nt = tl.sqrt_rn(st)
    ix, _ = _inv_norm(nx)
    it, _ = _inv_norm(nt)
    cos = acc * ix[:, None] * it[None, :]
    out = cos * _load_scale(scale_ptr, scale_val, SCALE_PTR)
    mask = b_ok[:, None] & c_ok[None, :]
    tl.store(out_ptr + rb[:, None] * stride_ob + rc[None, :], _cast_out(out, out_ptr, OUT_BF16), mask=mask)
    if SAVE:
        tl.store(cos_ptr + rb[:, None] * C + rc[None, :], cos, mask=mask)
        tl.store(nx_ptr + rb, nx, mask=b_ok & (pid_c == 0))
        tl.store(nt_ptr + rc, nt, mask=c_ok & (pid_b == 0))


@triton.jit
def cosine_fwd_per_image_kernel(
    x_ptr, t_ptr, out_ptr, cos_ptr, nx_ptr, nt_ptr, scale_ptr, scale_val,
    C, D,
    stride_xb, stride_tb, stride_tc, stride_ob,
    SCALE_PTR: tl.constexpr, SAVE: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per-image text ``[B, C, D]`` (CoCoOp): ``out[b, c] = s * cos(x_b, t_bc)``.

    Every text row is used by one image only, so this is a batched
    matrix-vector product bound by reading the text once: one program per
    ``(b, BLOCK_C classes)``, a loop over D accumulating dot products and both
    squared norms from the same tiles (no ``tl.dot``: there is no reuse to
    feed it).
    """
    b = tl.program_id(0).to(tl.int64)
    rc = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    c_ok = rc < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    st = tl.zeros([BLOCK_C], dtype=tl.float32)
    sx = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + rk
        k_ok = k < D
        x = tl.load(x_ptr + b * stride_xb + k, mask=k_ok, other=0.0).to(tl.float32)
        t = tl.load(
            t_ptr + b * stride_tb + rc[:, None] * stride_tc + k[None, :],
            mask=c_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(t * x[None, :], axis=1)
        st += tl.sum(t * t, axis=1)
        sx += x * x
    nx = tl.sqrt_rn(tl.sum(sx, axis=0))
    nt = tl.sqrt_rn(st)
    ix, _ = _inv_norm(nx)
    it, _ = _inv_norm(nt)
    cos = acc * ix * it
    out = cos * _load_scale(scale_ptr, scale_val, SCALE_PTR)
    tl.store(out_ptr + b * stride_ob + rc, _cast_out(out, out_ptr, OUT_BF16), mask=c_ok)
    if SAVE:
        tl.store(cos_ptr + b * C + rc, cos, mask=c_ok)
        tl.store(nt_ptr + b * C + rc, nt, mask=c_ok)
        if tl.program_id(1) == 0:
            tl.store(nx_ptr + b, nx)


@triton.jit
def cosine_bwd_shared_kernel(
    g_ptr, cos_ptr, row_ptr, oth_ptr, nrow_ptr, noth_ptr, drow_ptr, scale_ptr, scale_val,
    R, K, D,
    stride_gr, stride_gk, stride_cr, stride_ck, stride_row, stride_oth, stride_drow,
    SCALE_PTR: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient of one side of the shared-text logits (launched once per side).

    With ``H = s * grad``, ``r = 1/max(|.|, eps)`` and ``m = |.| > eps``:
    ``drow_i = r_i * sum_k H_ik r_k oth_k - m_i r_i^2 (sum_k H_ik cos_ik) row_i``.
    For the image side rows are images and ``k`` runs over classes; for the
    text side the strides of ``grad``/``cos`` are swapped. The first term is a
    ``tl.dot`` over ``k``; the projection term needs only ``sum_k H cos``
    (``u . du`` written with the saved cosines), accumulated in the same loop,
    so the epilogue needs no second pass over D.
    """
    rr = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_K)
    r_ok = rr < R
    d_ok = d < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    h = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = (k0 + rk).to(tl.int64)
        k_ok = k < K
        mk = r_ok[:, None] & k_ok[None, :]
        g = tl.load(g_ptr + rr[:, None] * stride_gr + k[None, :] * stride_gk, mask=mk, other=0.0).to(tl.float32)
        cs = tl.load(cos_ptr + rr[:, None] * stride_cr + k[None, :] * stride_ck, mask=mk, other=0.0)
        ik, _ = _inv_norm(tl.load(noth_ptr + k, mask=k_ok, other=1.0))
        o = tl.load(oth_ptr + k[:, None] * stride_oth + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(g * ik[None, :], o.to(tl.float32), acc, input_precision="ieee")
        h += tl.sum(g * cs, axis=1)
    ir, big = _inv_norm(tl.load(nrow_ptr + rr, mask=r_ok, other=1.0))
    row = tl.load(row_ptr + rr[:, None] * stride_row + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    proj = tl.where(big, ir * ir * h, 0.0)
    scale = _load_scale(scale_ptr, scale_val, SCALE_PTR)
    drow = scale * (ir[:, None] * acc - proj[:, None] * row.to(tl.float32))
    tl.store(
        drow_ptr + rr[:, None] * stride_drow + d[None, :],
        _cast_out(drow, drow_ptr, OUT_BF16),
        mask=r_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def cosine_bwd_per_image_kernel(
    g_ptr, cos_ptr, x_ptr, t_ptr, nx_ptr, nt_ptr, dx_ptr, dt_ptr, scale_ptr, scale_val,
    C, D,
    stride_gb, stride_gc, stride_xb, stride_tb, stride_tc,
    NEED_DX: tl.constexpr, NEED_DT: tl.constexpr, SCALE_PTR: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Both gradients of the per-image logits from one read of the text.

    One program per ``(b, BLOCK_D features)`` walks the classes: it writes
    ``dt_bc = r_bc H_bc r_b x_b - m_bc r_bc^2 H_bc cos_bc t_bc`` tile by tile
    and accumulates ``sum_c H_bc r_bc t_bc`` and ``sum_c H_bc cos_bc`` for
    ``dx_b`` (same formula as the shared case), stored after the loop.
    """
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    scale = _load_scale(scale_ptr, scale_val, SCALE_PTR)
    x = tl.load(x_ptr + b * stride_xb + d, mask=d_ok, other=0.0).to(tl.float32)
    ix, x_big = _inv_norm(tl.load(nx_ptr + b))
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    h = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        c_ok = c < C
        hg = scale * tl.load(g_ptr + b * stride_gb + c * stride_gc, mask=c_ok, other=0.0).to(tl.float32)
        cs = tl.load(cos_ptr + b * C + c, mask=c_ok, other=0.0)
        it, t_big = _inv_norm(tl.load(nt_ptr + b * C + c, mask=c_ok, other=1.0))
        mask = c_ok[:, None] & d_ok[None, :]
        offs = b * stride_tb + c[:, None] * stride_tc + d[None, :]
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_DT:
            proj = tl.where(t_big, it * it * hg * cs, 0.0)
            dt = (it * hg * ix)[:, None] * x[None, :] - proj[:, None] * t
            tl.store(dt_ptr + offs, _cast_out(dt, dt_ptr, OUT_BF16), mask=mask)
        if NEED_DX:
            acc += tl.sum((hg * it)[:, None] * t, axis=0)
            h += hg * cs
    if NEED_DX:
        hx = tl.sum(h, axis=0)
        proj_x = tl.where(x_big, ix * ix * hx, 0.0)
        dx = ix * acc - proj_x * x
        tl.store(dx_ptr + b * stride_xb + d, _cast_out(dx, dx_ptr, OUT_BF16), mask=d_ok)
