"""Finding plug-ins (built-ins and the ``vlprompt`` entry-point group) and keying
what they register by name.

``$VLPROMPT_DISABLE_PLUGINS`` (comma-separated entry-point names, e.g. ``coop``)
keeps installed plug-ins from loading; built-ins cannot be disabled.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import __version__, hookspecs
from .api.entries import compose_methods
from .errors import UserError
from .recipes import check_recipe

ENTRY_POINT_GROUP = "vlprompt"

#: Modules registered before any entry point, through the very same hooks.
BUILTIN_PLUGINS = (
    "vlprompt_core.builtin.open_clip_backbone",
    "vlprompt_core.builtin.zeroshot",
    "vlprompt_core.builtin.datasets",
    "vlprompt_core.builtin.protocols",
)

KINDS = {
    "backbone": "vlprompt_backbones",
    "method": "vlprompt_methods",
    "dataset": "vlprompt_datasets",
    "protocol": "vlprompt_protocols",
    "logger": "vlprompt_loggers",
}


@dataclass(frozen=True)
class Source:
    """Where a registration came from."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.plugin} ({self.distribution} {self.version})"


@dataclass(frozen=True)
class LoadFailure:
    entry_point: str
    distribution: str
    error: str


def disabled_plugins() -> set[str]:
    return {n.strip() for n in os.environ.get("VLPROMPT_DISABLE_PLUGINS", "").split(",") if n.strip()}


@dataclass
class Registry:
    """Everything registered, by kind and name, with where it came from."""

    entries: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: {} for k in KINDS})
    sources: dict[tuple[str, str], Source] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)
    pm: pluggy.PluginManager | None = None
    #: Where each registered plug-in (by its pluggy name) comes from, hooks-only ones too.
    plugins: dict[str, Source] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.entries[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.entries[kind])) or "none"
            raise UserError(f"{kind}.name: unknown {kind} {name!r} (registered: {known})") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    @property
    def hook(self):
        assert self.pm is not None
        return self.pm.hook


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def make_plugin_manager(
    entry_points: bool = True, extra: tuple[tuple[str, Any], ...] = ()
) -> tuple[pluggy.PluginManager, list[LoadFailure], dict[str, Source]]:
    """A plugin manager with the built-ins, (optionally) every entry point, and
    ``extra`` ``(name, plugin object)`` pairs (tests register toy plug-ins this way).

    An entry point that fails to import is recorded, not raised, so one broken
    plug-in never takes the others down.
    """
    pm = pluggy.PluginManager("vlprompt")
    pm.add_hookspecs(hookspecs)
    sources: dict[str, Source] = {}
    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        sources[modname] = Source(modname, "vlprompt", __version__)
    for name in disabled_plugins():
        pm.set_blocked(name)
    failures: list[LoadFailure] = []
    for name, plugin in extra:
        pm.register(plugin, name=name)
        sources[name] = Source(name, "(registered in-process)", "-")
    if entry_points:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist, version = _dist_of(ep)
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin: ModuleType = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - any import error is reported, not fatal
                failures.append(LoadFailure(f"{ep.name} = {ep.value}", dist, f"{type(exc).__name__}: {exc}"))
                continue
            sources[ep.name] = Source(ep.name, dist, version)
    return pm, failures, sources


def build_registry(pm: pluggy.PluginManager, failures: list[LoadFailure], sources: dict[str, Source]) -> Registry:
    reg = Registry(failures=list(failures), pm=pm, plugins=dict(sources))
    for kind, hookname in KINDS.items():
        caller = getattr(pm.hook, hookname)
        for impl in caller.get_hookimpls():
            source = sources.get(impl.plugin_name, Source(impl.plugin_name, "?", "?"))
            try:
                registered = impl.function() or []
            except Exception as exc:  # noqa: BLE001
                reg.failures.append(LoadFailure(impl.plugin_name, source.distribution, f"{hookname}: {type(exc).__name__}: {exc}"))
                continue
            for entry in registered:
                problem = _entry_problem(kind, entry)
                if problem:
                    reg.failures.append(LoadFailure(impl.plugin_name, source.distribution, f"{hookname}: {problem}"))
                    continue
                previous = reg.sources.get((kind, entry.name))
                if previous is not None:
                    raise UserError(
                        f"{kind} {entry.name!r} is registered twice: by {previous} and by {source}; "
                        "uninstall one of them"
                    )
                reg.entries[kind][entry.name] = entry
                reg.sources[(kind, entry.name)] = source
    reg.entries["method"] = compose_methods(reg.entries["method"])  # wrappers take the others' sections
    return reg


def _entry_problem(kind: str, entry: Any) -> str | None:
    """Why a registered entry cannot be used (a fault of its plug-in), or None."""
    if kind != "method" or entry.recipe is None:
        return None
    try:
        check_recipe(entry.recipe, entry.options, entry.name)
    except UserError as exc:
        return "; ".join(exc.problems)
    return None


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry (built once; ``refresh`` re-reads entry points)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = build_registry(*make_plugin_manager())
    return _REGISTRY
