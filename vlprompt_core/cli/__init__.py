"""``vlprompt``: run, eval, validate, predict, export, list, schema, data list, data check.

One file per command family, each registering its commands on :data:`app`
(:mod:`.common`, with what they all share: consoles, errors, progress bars):

* :mod:`.running` — ``run``, ``eval``, ``validate``;
* :mod:`.predict` — ``predict``, ``export``;
* :mod:`.sweeping` — ``sweep``;
* :mod:`.installed` — ``list``, ``schema``;
* :mod:`.data` — the ``data`` group: ``data list``, ``data check``;
* :mod:`.reporting` — ``report``.

They are imported below in the order ``vlprompt --help`` lists them; then every help
text is reflowed (:func:`_reflow_help`), once all are registered.
"""

from __future__ import annotations

import inspect

import typer

from .common import app, err, out
from .running import eval_, run, validate
from .predict import export_, predict
from .sweeping import sweep
from .installed import list_, schema
from .data import ROOT_HELP, data_app, data_check, data_list
from .reporting import report

__all__ = ["app", "main", "out", "err", "run", "eval_", "validate", "predict", "export_", "sweep", "list_", "schema",
           "data_app", "data_list", "data_check", "ROOT_HELP", "report"]


def _paragraphs(text):
    """A docstring as whole paragraphs: its hard line breaks joined, so that help is
    wrapped at the terminal's width, never mid-sentence where the source was wrapped.
    A paragraph starting with ``\\b`` (click: keep as is) and what follows ``\\f``
    (click: not shown) are left alone."""
    if not isinstance(text, str):  # None, or typer's placeholder of an unset default
        return text
    shown, cut, rest = inspect.cleandoc(text).partition("\f")
    paragraphs = [p if p.startswith("\b") else " ".join(p.split()) for p in shown.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p) + cut + rest


def _reflow_help(typer_app: typer.Typer) -> None:
    """Every command's help text (its docstring unless ``help=`` is given) and every
    group's, as whole paragraphs (:func:`_paragraphs`)."""
    typer_app.info.help = _paragraphs(typer_app.info.help)
    for command in typer_app.registered_commands:
        command.help = _paragraphs(command.help if command.help is not None else inspect.getdoc(command.callback))
    for group in typer_app.registered_groups:
        group.help = _paragraphs(group.help)
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


_reflow_help(app)


def main() -> None:
    app()
