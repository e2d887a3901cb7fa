"""The Triton backend: the two ops as ``torch.autograd.Function`` s over fused kernels.

Same signatures, shapes, dtypes and errors as :mod:`vlprompt_kernels.reference`;
use it through the dispatching functions of :mod:`vlprompt_kernels`. It imports
``triton`` (so only :mod:`vlprompt_kernels._dispatch` imports it, lazily) and
launches nothing at import.

Supported: float32, bfloat16 and float16 tensors on one CUDA device (or on the
CPU under ``TRITON_INTERPRET=1``), a ``logit_scale`` that is a number or a 0-dim
tensor. :func:`unsupported` says why other inputs are not.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from . import _triton_kernels as K
from ._checks import check_assemble, check_cosine

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Triton decides at definition time (TRITON_INTERPRET) whether kernels are compiled or interpreted
INTERPRETED = type(K.assemble_fwd_kernel).__name__ == "InterpretedFunction"


def unsupported(op: str, *tensors: torch.Tensor | None, scale=None) -> str | None:
    """Why this backend cannot run ``op`` on these inputs, or None if it can."""
    for t in tensors:
        if t is not None and t.dtype not in DTYPES:
            return f"dtype {str(t.dtype).removeprefix('torch.')} (the Triton kernels take float32, bfloat16, float16)"
    if op == "cosine_logits":
        if tensors[0].dtype != tensors[1].dtype:
            return "image and text features of different dtypes"
        if isinstance(scale, torch.Tensor) and scale.dim() != 0:
            return f"a logit_scale of shape {list(scale.shape)} (the Triton kernel takes a number or a 0-dim tensor)"
    return None


def _pow2(n: int, lo: int = 1, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _same_device(op: str, *tensors: torch.Tensor | None) -> torch.device:
    """The one device of ``tensors`` (kernels read raw pointers: a stray tensor would be a crash)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors on different devices: {', '.join(sorted(map(str, devices)))}")
    return devices.pop()


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU, not on whichever is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ------------------------------------------------------------------ assembly


def _slot_csr(slots32: torch.Tensor, groups: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert the slot map: flat ``c*L + t`` positions sorted by key ``group*M + j``, and
    the offsets of each key. On the slots' device, without a host synchronisation."""
    n_cls, length = slots32.shape
    dev = slots32.device
    group = torch.arange(n_cls, device=dev, dtype=torch.int64)[:, None] if groups > 1 else 0
    key = torch.where(slots32 >= 0, group * m + slots32.long(), groups * m)  # invalid -> last key
    key_sorted, order = torch.sort(key.flatten(), stable=True)
    offsets = torch.searchsorted(key_sorted, torch.arange(groups * m + 1, device=dev, dtype=torch.int64))
    return order.to(torch.int32 if n_cls * length < 2**31 else torch.int64), offsets


class _Assemble(torch.autograd.Function):
    @staticmethod
    def forward(ctx_, base, ctx, slots, positional, lead):
        n_cls, length, dim = base.shape
        groups = ctx.shape[-3]  # ctx is [*P, C or 1, M, D]: one context per class, or shared
        n_rep = _prod(ctx.shape[:-3])
        out_dtype = torch.promote_types(base.dtype, ctx.dtype)
        if positional is not None:
            out_dtype = torch.promote_types(out_dtype, positional.dtype)
        out = torch.empty(*lead, length, dim, dtype=out_dtype, device=base.device)
        slots32 = slots.to(device=base.device, dtype=torch.int32).contiguous()
        ctx_c = ctx.contiguous()
        m = ctx.shape[-2]
        if out.numel():
            block_d = _pow2(dim, 16, 256)
            block_r = max(2048 // block_d, 1)  # 16 elements a thread
            pos = positional[:length].contiguous() if positional is not None else out
            with _device_guard(base.device):
                K.assemble_fwd_kernel[(triton.cdiv(n_cls * length, block_r), triton.cdiv(dim, block_d))](
                    base.contiguous(), ctx_c, slots32, pos, out,
                    n_rep, n_cls * length, dim,
                    groups * m * dim, m * dim if groups > 1 else 0, length,
                    HAS_POS=positional is not None, OUT_BF16=out_dtype == torch.bfloat16,
                    BLOCK_R=block_r, BLOCK_D=block_d,
                )  # fmt: skip
        ctx_.save_for_backward(slots32)
        ctx_.shapes = (n_rep, groups, m, n_cls, length, dim)
        ctx_.ctx_shape = ctx.shape
        ctx_.ctx_dtype = ctx.dtype
        ctx_.base_dtype = base.dtype
        ctx_.pos_info = None if positional is None else (positional.shape[0], positional.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx_, grad):
        (slots32,) = ctx_.saved_tensors
        n_rep, groups, m, n_cls, length, dim = ctx_.shapes
        need_base, need_ctx, _, need_pos, _ = ctx_.needs_input_grad
        grad = grad.contiguous()
        d_base = d_ctx = d_pos = None
        if need_ctx:
            d_ctx = torch.empty(n_rep, groups, m, dim, dtype=ctx_.ctx_dtype, device=grad.device)
            if d_ctx.numel():
                order, offsets = _slot_csr(slots32, groups, m)
                block_d = _pow2(dim, 16, 128 if n_rep * groups * m >= 256 else 64)  # more programs when few rows
                with _device_guard(grad.device):
                    K.assemble_bwd_kernel[(n_rep * groups * m, triton.cdiv(dim, block_d))](
                        grad, order, offsets, d_ctx,
                        groups, m, n_cls * length * dim, dim,
                        BLOCK_K=16 if groups == 1 else 2, BLOCK_D=block_d, OUT_BF16=ctx_.ctx_dtype == torch.bfloat16,
                    )  # fmt: skip
            d_ctx = d_ctx.reshape(ctx_.ctx_shape)
        if need_base or need_pos:
            # frozen in every method; computed with PyTorch for completeness (same as the reference's autograd)
            per_class = grad.reshape(-1, n_cls, length, dim).sum(0)
            if need_base:
                d_base = per_class.masked_fill((slots32 >= 0)[..., None], 0).to(ctx_.base_dtype)
            if need_pos:
                rows, pos_dtype = ctx_.pos_info
                d_pos = grad.new_zeros(rows, dim, dtype=pos_dtype)
                d_pos[:length] = per_class.sum(0)
        return d_base, d_ctx, None, d_pos, None


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def assemble_prompts(
    base: torch.Tensor,
    ctx: torch.Tensor,
    slots: torch.Tensor,
    positional: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused :func:`vlprompt_kernels.reference.assemble_prompts` (see there for the contract).

    ``ctx``'s leading dims ``S`` are folded to ``[prod(S[:-1]), S[-1] in {1, C}]``,
    so any number of them works (e.g. ``(L, B, 1)`` Monte-Carlo samples per image);
    the output ``[*S[:-1], C, L, D]`` is written directly, and viewing it as
    ``[B*C, L, D]`` for the text tower costs nothing. Only ``ctx`` normally needs
    a gradient: the backward kernel reduces it over the classes (and nothing
    else) the layout shares it across.
    """
    lead = check_assemble(base, ctx, slots)
    _same_device("assemble_prompts", base, ctx, positional)
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0)  # () -> (1,): one context for all classes
    return _Assemble.apply(base, ctx, slots, positional, lead)


# ------------------------------------------------------------- cosine logits


def _scale_args(logit_scale, device):
    """(scale tensor or a dummy, float value, whether the kernel reads the tensor)."""
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.detach().reshape(()).to(device=device, dtype=torch.float32), 0.0, True
    return None, float(logit_scale), False


class _Cosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx_, image, text, logit_scale, save):
        b_n, dim = image.shape
        per_image = text.dim() == 3
        c_n = text.shape[-2]
        dev = image.device
        image = image.contiguous()
        text = text.contiguous()
        out = torch.empty(b_n, c_n, dtype=image.dtype, device=dev)
        f32 = {"dtype": torch.float32, "device": dev}
        cos = torch.empty(b_n, c_n, **f32) if save else out
        nx = torch.empty(b_n, **f32) if save else out
        nt = torch.empty(*text.shape[:-1], **f32) if save else out
        scale_t, scale_v, scale_ptr = _scale_args(logit_scale, dev)
        scale_arg = scale_t if scale_ptr else out
        if out.numel():
            guard = _device_guard(dev)
            if dim == 0:
                out.zero_()
                for buf in (cos, nx, nt) if save else ():
                    buf.zero_()
            elif per_image:
                block_c = 16
                block_k = _pow2(dim, 16, 64)
                with guard:
                    K.cosine_fwd_per_image_kernel[(b_n, triton.cdiv(c_n, block_c))](
                        image, text, out, cos, nx, nt, scale_arg, scale_v,
                        c_n, dim,
                        image.stride(0), text.stride(0), text.stride(1), out.stride(0),
                        SCALE_PTR=scale_ptr, SAVE=save, OUT_BF16=image.dtype == torch.bfloat16,
                        BLOCK_C=block_c, BLOCK_K=block_k,
                    )  # fmt: skip
            else:
                block_b = _pow2(b_n, 16, 32)
                block_c = _pow2(c_n, 16, 32)
                block_k = _pow2(dim, 16, 32)
                with guard:
                    K.cosine_fwd_shared_kernel[(triton.cdiv(b_n, block_b), triton.cdiv(c_n, block_c))](
                        image, text, out, cos, nx, nt, scale_arg, scale_v,
                        b_n, c_n, dim,
                        image.stride(0), text.stride(0), out.stride(0),
                        SCALE_PTR=scale_ptr, SAVE=save, OUT_BF16=image.dtype == torch.bfloat16,
                        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=block_k,
                    )  # fmt: skip
        if save:
            ctx_.save_for_backward(image, text, cos, nx, nt, scale_t)
        ctx_.scale = (scale_v, scale_ptr)
        is_tensor = isinstance(logit_scale, torch.Tensor)
        ctx_.scale_meta = (logit_scale.shape, logit_scale.dtype, logit_scale.device) if is_tensor else None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx_, grad):
        image, text, cos, nx, nt, scale_t = ctx_.saved_tensors
        scale_v, scale_ptr = ctx_.scale
        need_x, need_t, need_s, _ = ctx_.needs_input_grad
        b_n, dim = image.shape
        c_n = cos.shape[1]
        bf16 = image.dtype == torch.bfloat16
        launch = grad.numel() > 0 and dim > 0
        new = torch.empty_like if launch else torch.zeros_like
        dx = new(image) if need_x else None
        dt = new(text) if need_t else None
        scale_arg = scale_t if scale_ptr else cos
        with _device_guard(image.device):
            if not launch:
                pass  # empty: the zero gradients above
            elif text.dim() == 3:
                block_c = 16
                block_d = _pow2(dim, 16, 64)
                K.cosine_bwd_per_image_kernel[(b_n, triton.cdiv(dim, block_d))](
                    grad, cos, image, text, nx, nt, dx if need_x else cos, dt if need_t else cos, scale_arg, scale_v,
                    c_n, dim,
                    grad.stride(0), grad.stride(1), image.stride(0), text.stride(0), text.stride(1),
                    NEED_DX=need_x, NEED_DT=need_t, SCALE_PTR=scale_ptr, OUT_BF16=bf16,
                    BLOCK_C=block_c, BLOCK_D=block_d,
                )  # fmt: skip
            else:
                sides = []
                if need_x:  # rows = images, k = classes
                    sides.append((image, text, nx, nt, dx, b_n, c_n, grad.stride(0), grad.stride(1), c_n, 1))
                if need_t:  # rows = classes, k = images: grad and cos transposed through their strides
                    sides.append((text, image, nt, nx, dt, c_n, b_n, grad.stride(1), grad.stride(0), 1, c_n))
                for row, oth, n_row, n_oth, d_row, r_n, k_n, sgr, sgk, scr, sck in sides:
                    block_r = _pow2(r_n, 16, 32)
                    block_d = _pow2(dim, 16, 64)
                    K.cosine_bwd_shared_kernel[(triton.cdiv(r_n, block_r), triton.cdiv(dim, block_d))](
                        grad, cos, row, oth, n_row, n_oth, d_row, scale_arg, scale_v,
                        r_n, k_n, dim,
                        sgr, sgk, scr, sck, row.stride(0), oth.stride(0), d_row.stride(0),
                        SCALE_PTR=scale_ptr, OUT_BF16=bf16,
                        BLOCK_R=block_r, BLOCK_K=32, BLOCK_D=block_d,
                    )  # fmt: skip
        d_scale = None
        if need_s:
            shape, dtype, device = ctx_.scale_meta
            d_scale = (grad.float() * cos).sum().reshape(shape).to(dtype=dtype, device=device)
        return dx, dt, d_scale, None


def cosine_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Fused :func:`vlprompt_kernels.reference.cosine_logits` (see there for the contract):
    norms, product and scale in one kernel per direction, float32 accumulation, one
    rounding to the feature dtype."""
    check_cosine(image_features, text_features)
    _same_device("cosine_logits", image_features, text_features)  # a 0-dim scale may live anywhere
    inputs = (image_features, text_features, logit_scale)
    save = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
    return _Cosine.apply(image_features, text_features, logit_scale, save)
