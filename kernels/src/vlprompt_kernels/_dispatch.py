"""Which backend runs the public ops: the setting, Triton's availability, the log line.

The setting, first match wins: :func:`use_backend` (the engine passes the spec
field), the environment variable ``VLPROMPT_KERNELS``, else ``"auto"``.

* ``"reference"``: always the PyTorch reference.
* ``"auto"``: the Triton kernels for CUDA tensors of a supported dtype when
  ``triton`` imports (compiled, not the interpreter), the reference otherwise.
* ``"triton"``: the Triton kernels or a one-line :class:`BackendUnavailable`
  error, never a silent fallback. CPU tensors are accepted only under
  ``TRITON_INTERPRET=1`` (Triton's interpreter: correctness, not speed).

``triton`` is imported on first need, never at package import. The first call
that settles on a backend for a reason logs one line on the ``vlprompt_kernels``
logger (INFO; WARNING when CUDA tensors fall back because Triton is missing);
the same choice is not logged again in the process.
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

import torch

from . import reference

ENV_VAR = "VLPROMPT_KERNELS"
CHOICES = ("auto", "reference", "triton")

log = logging.getLogger("vlprompt_kernels")

_lock = threading.Lock()
_forced: str | None = None
_triton: tuple[ModuleType | None, str | None, str | None] | None = None  # (backend module, version, error)
_announced: set[tuple[str, str]] = set()


class BackendUnavailable(ValueError):
    """The Triton backend was requested but cannot run these inputs here."""


def _check_name(name: str, where: str) -> str:
    value = name.strip().lower()
    if value not in CHOICES:
        raise ValueError(f"{where}: unknown kernels backend {name!r}; choose one of {', '.join(CHOICES)}")
    return value


def use_backend(name: str | None) -> str | None:
    """Set the backend of the public ops for this process: ``"auto"``, ``"reference"`` or
    ``"triton"``; ``None`` goes back to ``$VLPROMPT_KERNELS`` (default ``"auto"``).

    Returns the previous :func:`use_backend` setting (``None`` if there was none), so
    ``previous = use_backend("reference"); ...; use_backend(previous)`` restores it.
    """
    global _forced
    value = None if name is None else _check_name(name, "use_backend")
    with _lock:
        previous, _forced = _forced, value
    return previous


def requested() -> tuple[str, str]:
    """The backend asked for and where the request comes from."""
    if _forced is not None:
        return _forced, "use_backend()"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"${ENV_VAR}"), f"${ENV_VAR}"
    return "auto", "default"


def interpreting() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter.

    Triton reads ``TRITON_INTERPRET`` when the kernels are defined, so once the
    backend is imported the answer is fixed by how its kernels were built;
    before that it is what the environment says.
    """
    if _triton is not None and _triton[0] is not None:
        return _triton[0].INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_status() -> tuple[ModuleType | None, str | None, str | None]:
    """``(triton backend module or None, triton version, why it is unavailable)``; imports once."""
    global _triton
    if _triton is None:
        with _lock:
            if _triton is None:
                try:
                    import triton

                    from . import triton_backend

                    _triton = (triton_backend, str(triton.__version__), None)
                except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken install failing at import
                    message = str(exc).splitlines()[0] if str(exc) else ""
                    _triton = (None, None, f"{type(exc).__name__}: {message}".rstrip(": "))
    return _triton


def _device_type(device) -> str:
    return torch.device(device).type


def _decide(op: str, device_type: str, unsupported=None) -> tuple[ModuleType, str, str]:
    """``(backend module, backend name, reason)`` for ``op`` on this device, or raise."""
    name, source = requested()
    if name == "reference":
        return reference, "reference", f"requested by {source}"
    module, _, error = triton_status()
    forced = name == "triton"
    if module is None:
        if forced:
            raise BackendUnavailable(f"kernels backend 'triton' ({source}): triton is not importable ({error})")
        return reference, "reference", f"triton is not importable ({error})"
    if device_type != "cuda" and not (forced and interpreting()):
        if forced:
            raise BackendUnavailable(
                f"kernels backend 'triton' ({source}): {op} got {device_type} tensors; the Triton kernels need "
                "CUDA tensors (or TRITON_INTERPRET=1 to run them in Triton's CPU interpreter)"
            )
        return reference, "reference", f"{device_type} tensors (the Triton kernels run on CUDA devices)"
    if device_type == "cuda" and interpreting() and not forced:
        return reference, "reference", "TRITON_INTERPRET=1 (the interpreter is for tests; force 'triton' to use it)"
    why = unsupported() if unsupported is not None else None
    if why is not None:
        if forced:
            raise BackendUnavailable(f"kernels backend 'triton' ({source}): {op} has no kernel for {why}")
        return reference, "reference", f"no kernel for {why}"
    where = "Triton interpreter" if interpreting() else f"triton {triton_status()[1]}"
    return module, "triton", f"{where} on {device_type}" + ("" if forced else " (auto)")


def select(op: str, device, unsupported=None) -> ModuleType:
    """The backend module that runs ``op``; logs a choice the first time it is made."""
    device_type = _device_type(device)
    module, name, reason = _decide(op, device_type, unsupported)
    key = (name, reason)
    if key not in _announced:
        with _lock:
            first = key not in _announced
            _announced.add(key)
        if first:
            slow = name == "reference" and device_type == "cuda" and "not importable" in reason
            label = "PyTorch reference" if name == "reference" else "Triton"
            level = logging.WARNING if slow else logging.INFO
            log.log(level, "vlprompt_kernels: using the %s backend: %s", label, reason)
    return module


def backend_info(device=None) -> dict:
    """What the public ops will use on ``device`` (default: ``cuda`` if available, else ``cpu``),
    as a flat, JSON-serialisable dict for logs and ``results.json``.

    Keys: ``requested`` (auto/reference/triton), ``source`` (``default``,
    ``$VLPROMPT_KERNELS`` or ``use_backend()``), ``device``, ``backend``
    (``"triton"``, ``"reference"``, or ``None`` when the forced backend cannot run:
    then ``error`` holds the message the ops raise), ``reason``,
    ``triton_available``, ``triton_version``, ``triton_error``,
    ``triton_interpreter``. Assumes inputs of a supported dtype (float32,
    bfloat16, float16); float64 always runs the reference.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name, source = requested()
    module, version, error = triton_status()
    info = {
        "requested": name,
        "source": source,
        "device": str(torch.device(device)),
        "backend": None,
        "reason": None,
        "error": None,
        "triton_available": module is not None,
        "triton_version": version,
        "triton_error": error,
        "triton_interpreter": interpreting(),
    }
    try:
        _, info["backend"], info["reason"] = _decide("the ops", _device_type(device))
    except BackendUnavailable as exc:
        info["error"] = str(exc)
    return info


def _reset_for_tests() -> None:
    """Forget the import result and the logged choices (tests only)."""
    global _triton
    with _lock:
        _triton = None
        _announced.clear()
