"""What happens when something fails: one pair, a plug-in, or a logger.

A pair whose loss stops being finite, or whose plug-in raises, fails alone
(:class:`PairFailed`, :class:`PluginError`) and the run goes on; the user's own
mistakes (:class:`~vlprompt_core.errors.UserError`) and interruptions stop it. A
lifecycle hook that raises is reported and never stops a run. Tracebacks go to
``<output>/errors.log``; error lines point there.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..plugins import Registry


class PairFailed(Exception):
    """One (method, seed) pair could not finish (its loss stopped being finite, or its
    plug-in raised); it is recorded in ``results.json`` and the other pairs go on."""


class PluginError(Exception):
    """A plug-in raised (naming it and its distribution); the traceback is in ``errors.log``."""


def log_traceback(output: Path, what: str, exc: BaseException) -> Path:
    """Append ``exc``'s traceback, headed by the time and ``what`` failed, to
    ``<output>/errors.log``; return that path (error lines point to it)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "errors.log"
    with open(path, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n")
        f.write("".join(traceback.format_exception(exc)))
    return path


def plugin_call(registry: Registry, output: Path, kind: str, name: str, what: str, call: Callable[[], Any]) -> Any:
    """``call()``; an exception that is neither the user's (:class:`UserError`) nor an
    interruption becomes a :class:`PluginError` naming the plug-in and its
    distribution (the traceback goes to ``errors.log`` in the results folder)."""
    try:
        return call()
    except (UserError, PairFailed, PluginError, KeyboardInterrupt):
        raise
    except Exception as exc:
        source = registry.sources.get((kind, name))
        origin = f"plug-in {source.plugin} ({source.distribution} {source.version})" if source else "its plug-in"
        log = log_traceback(output, f"{kind} {name!r}, {what}", exc)
        raise PluginError(f"{what}: {kind} {name!r} from {origin} raised {type(exc).__name__}: {exc} "
                          f"(traceback in {log})") from exc


def notify(registry: Registry, log: Callable[[str], None], hook: str, **kwargs) -> None:
    """Call every implementation of a lifecycle ``hook``; one that raises is reported
    (naming its plug-in and distribution) and the run goes on."""
    for impl in getattr(registry.hook, hook).get_hookimpls():
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception as exc:  # noqa: BLE001 - a logger must never stop a run
            source = registry.plugins.get(impl.plugin_name)
            origin = f"{source.distribution} {source.version}" if source else "?"
            log(f"warning: plug-in {impl.plugin_name} ({origin}) failed in {hook}: {type(exc).__name__}: {exc}")
