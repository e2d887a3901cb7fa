"""What happens when something fails: one pair, a plug-in, a logger, the file
system, or the run is stopped.

A pair that diverges (a non-finite loss or score, an exploded trainable tensor), or whose plug-in raises, fails alone
(:class:`PairFailed`, :class:`PluginError`) and the run goes on; the user's own
mistakes (:class:`~vlprompt_core.errors.UserError`) and interruptions stop it. A
lifecycle hook that raises is reported and never stops a run. Tracebacks go to
``<output>/errors.log``; error lines point there.

Only a plug-in's own code is a plug-in's fault (:func:`plugin_call`): an error of
the file system that its code did not raise is about one of the engine's own files
(results, checkpoints, training states, the feature cache), and stops the run with
one line naming the file (:class:`~vlprompt_core.errors.StorageError`); a file the
engine reads that is not what it wrote is the user's to delete or fix (a
:class:`~vlprompt_core.errors.UserError` where it is read).

SIGTERM, what ``kill`` and schedulers send, stops a run as Ctrl-C does
(:func:`stop_signals`): both are a :class:`KeyboardInterrupt`, and the record says
which (:func:`interruption`).
"""

from __future__ import annotations

import contextlib
import copy
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..plugins import Registry


class PairFailed(Exception):
    """One (method, seed) pair could not finish (it diverged: a non-finite loss or score, an exploded tensor; or its
    plug-in raised); it is recorded in ``results.json`` and the other pairs go on."""


class PluginError(Exception):
    """A plug-in raised (naming it and its distribution); the traceback is in ``errors.log``."""


def log_traceback(output: Path, what: str, exc: BaseException) -> str:
    """Append ``exc``'s traceback, headed by the time and ``what`` failed, to
    ``<output>/errors.log``; return where it is, for error lines: ``traceback in
    <path>``, or why it could not be written (a full disk must not hide the error)."""
    path = output / "errors.log"
    try:
        output.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n")
            f.write("".join(traceback.format_exception(exc)))
    except OSError as failed:
        return f"no traceback: {path} could not be written ({failed.strerror or failed})"
    return f"traceback in {path}"


def _homes(registry: Registry, kind: str, name: str) -> set[str]:
    """The modules of a registered plug-in's code: those of the object it registered
    and of its entry's functions and classes. A module of vlprompt's own (a built-in)
    is itself (with its submodules, for a package); any other, its top-level package."""
    source = registry.sources.get((kind, name))
    objects: list[Any] = [registry.pm.get_plugin(source.plugin)] if source is not None and registry.pm else []
    entry = registry.entries.get(kind, {}).get(name)
    objects += [v for k, v in getattr(entry, "__dict__", {}).items() if k != "options" and callable(v)]
    homes = set()
    for obj in filter(None, objects):
        module = obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", None)
        if isinstance(module, str) and module:
            homes.add(module if module.startswith("vlprompt_core.") else module.split(".")[0])
    return homes


def raised_by(registry: Registry, kind: str, name: str, exc: BaseException) -> bool:
    """Whether the plug-in registered as ``kind`` ``name`` raised ``exc``: one of its
    modules (:func:`_homes`) is on the traceback."""
    homes = _homes(registry, kind, name)
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__") or ""
        if any(module == home or module.startswith(home + ".") for home in homes):
            return True
        tb = tb.tb_next
    return False


def plugin_call(registry: Registry, output: Path, kind: str, name: str, what: str, call: Callable[[], Any]) -> Any:
    """``call()``; an exception raised in it becomes a :class:`PluginError` naming the
    plug-in and its distribution (the traceback goes to ``errors.log`` in the results
    folder), unless it is not the plug-in's: the user's (:class:`UserError`), an
    interruption, or an error of the file system that the plug-in's own code did not
    raise (the engine's own file: its caller says which, :class:`StorageError`)."""
    try:
        return call()
    except (UserError, PairFailed, PluginError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and not raised_by(registry, kind, name, exc):
            raise
        source = registry.sources.get((kind, name))
        origin = f"plug-in {source.plugin} ({source.distribution} {source.version})" if source else "its plug-in"
        log = log_traceback(output, f"{kind} {name!r}, {what}", exc)
        raise PluginError(f"{what}: {kind} {name!r} from {origin} raised {type(exc).__name__}: {exc} "
                          f"({log})") from exc


def notify(registry: Registry, log: Callable[[str], None], hook: str, **kwargs) -> None:
    """Call every implementation of a lifecycle ``hook``; one that raises is reported
    (naming its plug-in and distribution) and the run goes on. Each gets a copy of the
    arguments, and the random generators the run draws from (Python's, NumPy's, torch's)
    are as it found them when it returns: a logger can change no result."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        for impl in getattr(registry.hook, hook).get_hookimpls():
            try:
                impl.function(**copy.deepcopy({k: kwargs[k] for k in impl.argnames}))
            except Exception as exc:  # noqa: BLE001 - a logger must never stop a run
                source = registry.plugins.get(impl.plugin_name)
                origin = f"{source.distribution} {source.version}" if source else "?"
                log(f"warning: plug-in {impl.plugin_name} ({origin}) failed in {hook}: {type(exc).__name__}: {exc}")
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class Terminated(KeyboardInterrupt):
    """A stop signal other than Ctrl-C (SIGTERM: what ``kill`` and schedulers send),
    raised where the run is, as Ctrl-C raises :class:`KeyboardInterrupt`."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(int(signum))

    @property
    def signum(self) -> int:
        return self.args[0]

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def interruption(exc: BaseException) -> str:
    """What stopped a run, as its record says it (``stopped by SIGTERM``)."""
    return f"stopped by {exc}" if isinstance(exc, Terminated) else "stopped by the user (Ctrl-C)"


def exit_code(exc: BaseException) -> int:
    """A stopped command's exit code: 128 + the signal's number, as a shell reports a
    process that signal ended (143 for SIGTERM, 130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


class _Stop:
    """What the stop-signal handler knows: which signal came first (later ones are
    ignored, so that the record of an interruption is written whole), whether it
    raises now, and what to call when it does not."""

    came: int = 0
    armed = True
    idle: Callable[[], None] = staticmethod(lambda: None)


def _raise_stop(signum: int) -> None:
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _on_stop_signal(signum: int, frame) -> None:
    first = not _Stop.came
    _Stop.came = _Stop.came or signum
    if not _Stop.armed:
        _Stop.idle()
    elif first:
        _raise_stop(signum)


def catch_stop_signals(*signums: int, armed: bool = True, idle: Callable[[], None] = lambda: None) -> dict[int, Any]:
    """From now on, the first of ``signums`` to come raises in the main thread as Ctrl-C
    does (:class:`Terminated`, or :class:`KeyboardInterrupt` for SIGINT) when ``armed``;
    when not, ``idle()`` is called (and the signal raises once armed: :func:`armed`).
    Later signals are ignored. Returns the handlers replaced."""
    _Stop.came, _Stop.armed, _Stop.idle = 0, armed, idle
    return {s: signal.signal(s, _on_stop_signal) for s in signums}


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """A stop signal raises while in the block (one that came before: on entry)."""
    _Stop.armed = True
    try:
        if _Stop.came:
            _raise_stop(_Stop.came)
        yield
    finally:
        _Stop.armed = False


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """In the block, SIGTERM stops the command as Ctrl-C does (a :class:`Terminated`
    raised where it is, once); the handler before is restored at its end. Outside the
    main thread (no signal reaches it) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = catch_stop_signals(signal.SIGTERM)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
