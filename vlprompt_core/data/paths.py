"""Paths and names: where datasets live by default (``$VLPROMPT_DATA``), a user's
path with its ``~`` expanded, whether a path written in a split file or image list
stays inside the folder it is relative to, and how a class name is written into a
prompt. Small helpers every layout and loader uses; they import nothing else of
:mod:`vlprompt_core.data`."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_root() -> Path:
    """``$VLPROMPT_DATA``, else ``~/.cache/vlprompt/data``."""
    return Path(os.environ.get("VLPROMPT_DATA", Path.home() / ".cache" / "vlprompt" / "data")).expanduser()


def expand_user(path: Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; unchanged when that home
    folder is unknown (the path is then simply not found, with its name as written)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def prompt_name(classname: str) -> str:
    """How a class name is written into a prompt (``apple_pie`` -> ``apple pie``)."""
    return classname.replace("_", " ")


def inside(root: Path, path: str) -> bool:
    """Whether ``root / path`` stays in ``root``: not absolute elsewhere, no ``..``
    climbing out. Compared as written, links not followed (an image folder may
    legitimately be a link to another disk)."""
    base = os.path.abspath(root)
    return os.path.commonpath([base, os.path.abspath(os.path.join(base, path))]) == base
