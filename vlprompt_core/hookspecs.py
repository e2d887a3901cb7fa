"""The hooks a vlprompt plug-in can implement.

A plug-in is a module (found through the ``vlprompt`` entry-point group, or one of
the built-ins in :data:`vlprompt_core.plugins.BUILTIN_PLUGINS`) with functions
decorated by :data:`vlprompt_core.hookimpl` and named like the specs below. An
implementation may accept any subset of a hook's arguments. The full reference,
with examples, is ``docs/hooks.md``; how to write each kind of plug-in is
``docs/writing-plugins.md``.
"""

from __future__ import annotations

from typing import Any

import pluggy

from .api import BackboneEntry, DatasetEntry, LoggerEntry, MethodEntry, ProtocolEntry

hookspec = pluggy.HookspecMarker("vlprompt")


# ---------------------------------------------------------------------------
# Registration hooks: what a plug-in provides, named. Called once per process,
# when the registry is built (the first command that needs it), in no particular
# order; every implementation is called and the lists are joined. A name
# registered twice is an error naming both plug-ins. An implementation that
# raises is reported by ``vlprompt list`` and the other plug-ins keep working.
# ---------------------------------------------------------------------------


@hookspec
def vlprompt_backbones() -> list[BackboneEntry]:
    """Register vision-language backbones.

    Called once, when the registry is built. Each
    :class:`~vlprompt_core.api.BackboneEntry` names a backbone (the
    ``backbone.name`` of a run spec), its options model, a ``build(options)`` that
    returns a frozen :class:`~vlprompt_core.api.VisionLanguageBackbone`, and an
    optional ``check(options)`` that lists problems without loading weights.

    :return: a list of :class:`~vlprompt_core.api.BackboneEntry` (may be empty).
        The lists of all plug-ins are joined; names must be unique.
    """


@hookspec
def vlprompt_methods() -> list[MethodEntry]:
    """Register prompt-learning methods.

    Called once, when the registry is built. Each
    :class:`~vlprompt_core.api.MethodEntry` names a method (``method.name`` in a
    spec), its options model, the :class:`~vlprompt_core.api.PromptMethod`
    subclass (or any ``build(backbone, classes, options)``), a one-line
    description and its :class:`~vlprompt_core.recipes.Recipe`. A recipe naming
    unknown train fields or options is reported as a plug-in failure.

    :return: a list of :class:`~vlprompt_core.api.MethodEntry`. The lists of all
        plug-ins are joined; names must be unique.
    """


@hookspec
def vlprompt_datasets() -> list[DatasetEntry]:
    """Register datasets.

    Called once, when the registry is built (the built-in implementation reads
    every ``datasets_spec/*.yaml`` and ``$VLPROMPT_DATASETS_SPEC``). Each
    :class:`~vlprompt_core.api.DatasetEntry` has an options model, a
    ``load(options)`` returning :class:`~vlprompt_core.api.DatasetSplits`
    (canonical class names, templates, train/val/test items) and an optional
    cheap ``check(options)``.

    :return: a list of :class:`~vlprompt_core.api.DatasetEntry`. The lists of all
        plug-ins are joined; names must be unique.
    """


@hookspec
def vlprompt_protocols() -> list[ProtocolEntry]:
    """Register evaluation protocols.

    Called once, when the registry is built. Each
    :class:`~vlprompt_core.api.ProtocolEntry` has an options model (options typed
    ``list[DatasetRef]`` take dataset sections), ``plan(options, context)``
    returning a :class:`~vlprompt_core.api.Plan` per seed (what trains, which
    splits are scored under which classes) and ``summarize(options, accuracy)``
    mapping per-split accuracies to the headline metrics.

    :return: a list of :class:`~vlprompt_core.api.ProtocolEntry`. The lists of all
        plug-ins are joined; names must be unique.
    """


@hookspec
def vlprompt_loggers() -> list[LoggerEntry]:
    """Register loggers.

    Called once, when the registry is built. Each
    :class:`~vlprompt_core.api.LoggerEntry` names a logger (the ``name`` of a section
    in a spec's ``loggers:`` list), its options model and a one-line description. A
    logger does its work in the lifecycle hooks below; it is enabled for a run when
    the spec's ``loggers`` (in the ``spec`` given to :func:`vlprompt_run_start`)
    holds a section with its name, and should do nothing otherwise. A logger
    section never changes what a run computes nor its results keys.

    :return: a list of :class:`~vlprompt_core.api.LoggerEntry`. The lists of all
        plug-ins are joined; names must be unique.
    """


# ---------------------------------------------------------------------------
# Lifecycle hooks: for loggers and exporters. Called by the engine in the order
# below, for every registered implementation, one at a time: an implementation that
# raises is reported as a warning naming its plug-in, and the run goes on; return
# values are ignored.
# ---------------------------------------------------------------------------


@hookspec
def vlprompt_run_start(spec: dict[str, Any], output_dir: str) -> None:
    """A run begins.

    Called once per ``vlprompt run``/``eval``, after the backbone and the dataset
    are loaded and the first ``results.json`` is written, before any training.

    :param spec: the resolved run spec as plain data (JSON-able).
    :param output_dir: the results folder of the run.
    :return: nothing; return values are ignored.
    """


@hookspec
def vlprompt_epoch_end(
    method: str, seed: int, epoch: int, metrics: dict[str, float], output_dir: str
) -> None:
    """One training epoch of a (method, seed) pair ended.

    Called after the epoch's last optimiser step, the method's own
    ``on_epoch_end`` and the checkpoint write.

    :param method: the method's label in the results (its name, or the section's ``label``).
    :param seed: the seed of the pair.
    :param epoch: 0-based epoch index.
    :param metrics: at least ``epoch``, ``lr``, ``loss`` (mean over the epoch's
        images), ``train_acc`` (%), ``time_s`` (the epoch's wall time) and
        ``loss.<name>`` for each extra loss term.
    :param output_dir: the results folder of the run (as given to
        :func:`vlprompt_run_start`): tells apart runs made one after another in one
        process (a sweep).
    :return: nothing; return values are ignored.
    """


@hookspec
def vlprompt_evaluation_done(method: str, seed: int, results: dict[str, Any], output_dir: str) -> None:
    """A (method, seed) pair was trained (or loaded) and scored.

    Called after the pair is written to ``results.json``; pairs skipped because
    they were already done are not reported again.

    :param method: the method's label in the results.
    :param seed: the seed of the pair.
    :param results: what is stored for the pair: ``accuracy`` per scored split,
        ``summary`` (the protocol's headline metrics), ``epochs``, ``time_s``...
    :param output_dir: the results folder of the run (as given to
        :func:`vlprompt_run_start`).
    :return: nothing; return values are ignored.
    """


@hookspec
def vlprompt_run_end(results: dict[str, Any], output_dir: str) -> None:
    """A run finished: every (method, seed) pair is done.

    Called once, after the final ``results.json`` and ``results.md`` are written
    (not when a run fails).

    :param results: the whole ``results.json`` content (summary included).
    :param output_dir: the results folder of the run.
    :return: nothing; return values are ignored.
    """
