"""The kernels compile for real GPUs, checked on a machine without one.

The interpreter runs kernels as NumPy code: it accepts things the compiler
rejects (a non-constexpr global, a dtype mismatch in ``tl.where``, ...) and never
allocates registers. So a subprocess without ``TRITON_INTERPRET`` records every
launch the backend makes for a spread of dtypes, layouts and gradient needs
(launches are intercepted, nothing runs) and compiles each distinct kernel
specialisation ahead of time down to a cubin for sm_90 (H100) with Triton's own
``ptxas``: no GPU or driver is involved. A kernel that does not compile for the
GPU fails here, in CPU CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import vlprompt_kernels
from vlprompt_kernels import _dispatch

SRC = Path(vlprompt_kernels.__file__).resolve().parents[1]

SCRIPT = r"""
import itertools, json, time
import torch, triton
from triton.runtime.jit import JITFunction
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from vlprompt_kernels import triton_backend as T

launches = {}
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.int64: "i64"}

def record(self, *args, grid, warmup, **kwargs):
    values = dict(zip(self.arg_names, args)) | kwargs
    sig, const = {}, {}
    for param in self.params:
        name, v = param.name, values[param.name]
        if param.is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if -2**31 <= int(v) < 2**31 else "i64"
    key = (self.__name__, json.dumps(sig, sort_keys=True), json.dumps(const, sort_keys=True))
    launches[key] = (self, sig, const)

JITFunction.run = record

def trace(dtype, layouts, cosine_cases):
    for lead, pos in layouts:
        base = torch.randn(3, 7, 40).to(dtype)
        ctx = torch.randn(*lead, 2, 40).to(dtype).requires_grad_(True)
        slots = torch.full((3, 7), -1); slots[:, 1:3] = torch.arange(2)
        out = T.assemble_prompts(base, ctx, slots, torch.randn(8, 40).to(dtype) if pos else None)
        out.backward(torch.ones_like(out))
    for per_image, scale, need in cosine_cases:
        img = torch.randn(4, 40).to(dtype).requires_grad_("x" in need)
        txt = torch.randn(*((4,) if per_image else ()), 5, 40).to(dtype).requires_grad_("t" in need)
        T.cosine_logits(img, txt, scale).backward(torch.ones(4, 5, dtype=dtype))

ALL_COSINE = list(itertools.product((False, True), (10.0, torch.tensor(10.0)), ("xt", "x", "t")))
for dtype in (torch.float32, torch.bfloat16):  # float32 math / the bfloat16 rounding path: every variant
    trace(dtype, [((), True), ((3,), False), ((2, 1), True)], ALL_COSINE)
trace(torch.float16, [((2, 1), True)], [(False, 10.0, "xt"), (True, 10.0, "xt")])  # plain casts: a sample

start = time.time()
for (name, _, const), (fn, sig, const) in sorted(launches.items(), key=lambda kv: kv[0]):
    triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32))
kernels = sorted({k[0] for k in launches})
print(json.dumps({"compiled": len(launches), "kernels": kernels, "seconds": time.time() - start}))
"""


def test_every_launched_kernel_compiles_for_sm90():
    module, _, error = _dispatch.triton_status()
    if module is None:
        pytest.skip(f"triton is not importable ({error})")
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton has no bundled ptxas (not the CUDA build)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        check=False, capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kernels"] == sorted(
        [
            "assemble_bwd_kernel",
            "assemble_fwd_kernel",
            "cosine_bwd_per_image_kernel",
            "cosine_bwd_shared_kernel",
            "cosine_fwd_per_image_kernel",
            "cosine_fwd_shared_kernel",
        ]
    )
    assert report["compiled"] >= 20  # dtypes x layouts x gradient needs, deduplicated
