"""Backends the op suites run against, the ``cuda`` marker, hypothesis budgets.

Every suite that takes the ``backend`` fixture runs once per backend below; a new
backend is one more entry in ``BACKENDS``. The Triton backend runs on the CPU in
Triton's interpreter (``TRITON_INTERPRET=1``, set here on machines without CUDA
unless the caller chose otherwise) and on CUDA devices compiled; the CUDA entries
carry the ``cuda`` marker and are skipped where there is no GPU.

Hand-built loops, tolerances and hypothesis budgets live in ``kernel_testing.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest
import vlprompt_kernels
from vlprompt_kernels import _dispatch


@dataclass(frozen=True)
class Backend:
    name: str  # what use_backend() takes
    device: str
    dtypes: tuple[torch.dtype, ...]  # dtypes it runs (others are not its job)
    grad_dtype: torch.dtype  # the most precise of them, for gradient checks

    def __str__(self) -> str:
        return f"{self.name}-{self.device}"


LOW = (torch.float32, torch.bfloat16, torch.float16)
ALL_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REFERENCE_CPU = Backend("reference", "cpu", ALL_FLOATS, torch.float64)
TRITON_CPU = Backend("triton", "cpu", LOW, torch.float32)  # the interpreter
REFERENCE_CUDA = Backend("reference", "cuda", REFERENCE_CPU.dtypes, torch.float64)
TRITON_CUDA = Backend("triton", "cuda", LOW, torch.float32)


def _triton_skip() -> str | None:
    module, _, error = _dispatch.triton_status()
    return None if module is not None else f"triton is not importable ({error})"


def _why_skip(backend: Backend) -> str | None:
    if backend.device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if backend.name == "triton":
        if (why := _triton_skip()) is not None:
            return why
        if backend.device == "cpu" and not _dispatch.interpreting():
            return "Triton on CPU tensors needs TRITON_INTERPRET=1"
        if backend.device == "cuda" and _dispatch.interpreting():
            return "TRITON_INTERPRET=1 would interpret instead of compiling; unset it to test the GPU kernels"
    return None


def backend_params(*backends: Backend):
    return [
        pytest.param(b, id=str(b), marks=[pytest.mark.cuda] if b.device == "cuda" else [])
        for b in backends
    ]


ALL_BACKENDS = backend_params(REFERENCE_CPU, TRITON_CPU, REFERENCE_CUDA, TRITON_CUDA)
TRITON_BACKENDS = backend_params(TRITON_CPU, TRITON_CUDA)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Each backend in turn, forced through ``use_backend`` for the test's duration."""
    yield from _use(request.param)


@pytest.fixture(params=TRITON_BACKENDS)
def triton_backend(request):
    """The Triton backend on each device it runs on here."""
    yield from _use(request.param)


def _use(b: Backend):
    if (why := _why_skip(b)) is not None:
        pytest.skip(why)
    previous = vlprompt_kernels.use_backend(b.name)
    try:
        yield b
    finally:
        vlprompt_kernels.use_backend(previous)
