"""Backend selection: the setting and its sources, fallbacks, errors, the log line, hidden Triton."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import vlprompt_kernels
from vlprompt_kernels import BackendUnavailable, _dispatch, backend_info, reference, use_backend

SRC = Path(vlprompt_kernels.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_setting(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    previous = use_backend(None)
    _dispatch._announced.clear()
    yield
    use_backend(previous)


@pytest.fixture()
def calls(monkeypatch):
    """Which backend module's ops ran, in order."""
    seen = []
    modules = [reference]
    if _dispatch.triton_status()[0] is not None:
        modules.append(_dispatch.triton_status()[0])
    for module in modules:
        for op in ("assemble_prompts", "cosine_logits"):
            real = getattr(module, op)
            label = f"{module.__name__.rsplit('.', 1)[-1]}.{op}"

            def spy(*args, _real=real, _name=label, **kwargs):
                seen.append(_name)
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, op, spy)
    return seen


def needs_triton():
    if _dispatch.triton_status()[0] is None:
        pytest.skip("triton is not importable here")


def run_ops():
    base, ctx = torch.randn(3, 5, 4), torch.randn(2, 4, requires_grad=True)
    slots = torch.full((3, 5), -1)
    slots[:, 1:3] = torch.arange(2)
    out = vlprompt_kernels.assemble_prompts(base, ctx, slots)
    logits = vlprompt_kernels.cosine_logits(torch.randn(2, 4), out[:, 0], 10.0)
    logits.sum().backward()
    return out, logits


# ------------------------------------------------------------------- setting


def test_use_backend_validates_and_returns_the_previous_setting():
    assert use_backend("reference") is None
    assert use_backend("TRITON ") == "reference"  # case and spaces do not matter
    assert use_backend(None) == "triton"
    with pytest.raises(ValueError, match="unknown kernels backend 'cuda'"):
        use_backend("cuda")


def test_setting_sources_in_order(monkeypatch):
    assert _dispatch.requested() == ("auto", "default")
    monkeypatch.setenv("VLPROMPT_KERNELS", "reference")
    assert _dispatch.requested() == ("reference", "$VLPROMPT_KERNELS")
    use_backend("auto")  # an explicit call wins over the environment
    assert _dispatch.requested() == ("auto", "use_backend()")
    use_backend(None)
    monkeypatch.setenv("VLPROMPT_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"\$VLPROMPT_KERNELS: unknown kernels backend 'fast'"):
        run_ops()


def test_auto_runs_the_reference_on_cpu_tensors(calls):
    run_ops()
    assert calls == ["reference.assemble_prompts", "reference.cosine_logits"]
    info = backend_info("cpu")
    assert info["backend"] == "reference" and "cpu tensors" in info["reason"]


def test_forced_reference(calls, monkeypatch):
    monkeypatch.setenv("VLPROMPT_KERNELS", "reference")
    run_ops()
    assert calls == ["reference.assemble_prompts", "reference.cosine_logits"]
    assert backend_info("cuda")["backend"] == "reference"  # whatever the device


def needs_interpreter():
    needs_triton()
    if not _dispatch.interpreting():
        pytest.skip("the Triton kernels were compiled, not interpreted (TRITON_INTERPRET unset at import)")


def test_forced_triton_runs_the_interpreter_on_cpu(calls):
    needs_interpreter()
    use_backend("triton")
    run_ops()
    assert calls == ["triton_backend.assemble_prompts", "triton_backend.cosine_logits"]
    info = backend_info("cpu")
    assert info["backend"] == "triton" and "interpreter" in info["reason"] and info["triton_interpreter"]


def test_forced_triton_without_cuda_or_interpreter_is_a_one_line_error(monkeypatch):
    needs_triton()
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)  # as on a machine with compiled kernels
    use_backend("triton")
    with pytest.raises(BackendUnavailable) as err:
        run_ops()
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "\n" not in message and "CUDA tensors" in message and "TRITON_INTERPRET=1" in message
    info = backend_info("cpu")
    assert info["backend"] is None and info["error"] == message.replace("assemble_prompts", "the ops")


def test_forced_triton_rejects_dtypes_without_a_kernel(monkeypatch, calls):
    needs_triton()
    monkeypatch.setattr(_dispatch, "interpreting", lambda: True)  # CPU tensors allowed; nothing launches
    base, ctx = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    slots = torch.zeros(2, 3)
    use_backend("triton")
    with pytest.raises(BackendUnavailable, match="float64"):
        vlprompt_kernels.assemble_prompts(base, ctx, slots.long())
    with pytest.raises(BackendUnavailable, match="logit_scale of shape"):
        vlprompt_kernels.cosine_logits(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([10.0]))
    assert calls == []


def test_auto_decisions_on_cuda(monkeypatch):
    """The decision table for CUDA tensors, checked without a GPU."""
    needs_triton()
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    module, name, reason = _dispatch._decide("op", "cuda")
    assert name == "triton" and module is _dispatch.triton_status()[0] and "(auto)" in reason
    module, name, reason = _dispatch._decide("op", "cuda", lambda: "dtype float64")
    assert (module, name) == (reference, "reference") and "float64" in reason
    monkeypatch.setattr(_dispatch, "interpreting", lambda: True)  # never interpret behind the user's back
    module, name, reason = _dispatch._decide("op", "cuda")
    assert name == "reference" and "TRITON_INTERPRET" in reason


def test_backend_info_is_a_flat_json_record():
    info = backend_info("cpu")
    assert json.loads(json.dumps(info)) == info
    assert set(info) == {
        "requested", "source", "device", "backend", "reason", "error",
        "triton_available", "triton_version", "triton_error", "triton_interpreter",
    }
    assert info["requested"] == "auto" and info["source"] == "default" and info["device"] == "cpu"
    if info["triton_available"]:
        import triton

        assert info["triton_version"] == triton.__version__ and info["triton_error"] is None


def test_the_choice_is_logged_once_per_choice(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="vlprompt_kernels")
    for _ in range(3):
        run_ops()
    lines = [r.getMessage() for r in caplog.records if r.name == "vlprompt_kernels"]
    assert lines == [
        "vlprompt_kernels: using the PyTorch reference backend: cpu tensors (the Triton kernels run on CUDA devices)"
    ]
    monkeypatch.setenv("VLPROMPT_KERNELS", "reference")  # a different choice is worth one more line
    run_ops()
    run_ops()
    lines = [r.getMessage() for r in caplog.records if r.name == "vlprompt_kernels"]
    assert len(lines) == 2 and "requested by $VLPROMPT_KERNELS" in lines[1]


@pytest.mark.cuda
def test_auto_runs_triton_on_cuda(calls):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    needs_triton()
    if _dispatch.interpreting():
        pytest.skip("TRITON_INTERPRET=1")
    img, txt = torch.randn(4, 8, device="cuda"), torch.randn(5, 8, device="cuda")
    vlprompt_kernels.cosine_logits(img, txt, 100.0)
    assert calls == ["triton_backend.cosine_logits"]
    assert backend_info("cuda")["backend"] == "triton"


# ------------------------------------------------------------ in subprocesses


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "VLPROMPT_KERNELS"}
    full_env["PYTHONPATH"] = os.pathsep.join([str(SRC), full_env.get("PYTHONPATH", "")])
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False, capture_output=True, text=True, env=full_env,
    )


HIDDEN = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as if uninstalled
import json, logging
logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(levelname)s %(message)s")
import torch
import vlprompt_kernels
from vlprompt_kernels import reference

torch.manual_seed(0)
base, slots = torch.randn(3, 6, 8), torch.full((3, 6), -1)
slots[:, 1:3] = torch.arange(2)
for layout in [(), (3,), (2, 1), (2, 3)]:
    ctx = torch.randn(*layout, 2, 8, requires_grad=True)
    out = vlprompt_kernels.assemble_prompts(base, ctx, slots)
    assert torch.equal(out, reference.assemble_prompts(base, ctx, slots))
    img = torch.randn(out.shape[0] if out.dim() == 4 else 2, 8)
    text = out[..., 0, :]
    logits = vlprompt_kernels.cosine_logits(img, text, 100.0)
    assert torch.equal(logits, reference.cosine_logits(img, text, 100.0))
    logits.sum().backward()
    assert ctx.grad is not None
print("INFO", json.dumps(vlprompt_kernels.backend_info()))
vlprompt_kernels.use_backend("triton")
try:
    vlprompt_kernels.cosine_logits(img, text, 100.0)
except vlprompt_kernels.BackendUnavailable as exc:
    print("ERROR", exc)
print("MODULES", sorted(m for m in sys.modules if m.startswith("vlprompt_kernels")))
"""


def test_without_triton_everything_runs_on_the_reference_and_says_so_once():
    result = run_python(HIDDEN, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    logs = [line for line in result.stderr.splitlines() if line.startswith("LOG vlprompt_kernels")]
    assert len(logs) == 1, result.stderr  # eight op calls, forward and backward: one line
    assert logs[0] == (
        "LOG vlprompt_kernels INFO vlprompt_kernels: using the PyTorch reference backend: "
        "triton is not importable (ModuleNotFoundError: import of triton halted; None in sys.modules)"
    )
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    info = json.loads(out["INFO"])
    assert info["backend"] == "reference" and info["triton_available"] is False
    assert info["triton_version"] is None and info["triton_error"].startswith("ModuleNotFoundError")
    assert out["ERROR"] == (
        "kernels backend 'triton' (use_backend()): triton is not importable "
        "(ModuleNotFoundError: import of triton halted; None in sys.modules)"
    )
    assert "vlprompt_kernels.triton_backend" not in out["MODULES"]


def test_importing_the_package_imports_no_triton():
    result = run_python(
        """
        import sys
        import vlprompt_kernels
        vlprompt_kernels.backend_info  # the API is there...
        print(sorted(m for m in sys.modules if m == "triton" or m.startswith("triton.")))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # ...and triton is imported on first need only
