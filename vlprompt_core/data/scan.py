"""What a layout scanner returns: the split names, :class:`Scan` (the items found in
each split and every problem found, one line each) and the shortening of long lists
in problem lines. Shared by the split-file, class-folder and image-list layouts."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api import Item
from ..errors import UserError


# ------------------------------------------------------------------- layouts
#
# Each layout has a scanner that returns what it could read *and* every problem it
# found (one line each, saying what is wrong and how to fix it): the loaders raise
# the problems as one UserError, ``vlprompt data check`` / ``validate`` report them.

SPLITS = ("train", "val", "test")

#: Problems of one kind shown before "... and N more".
SHOWN = 3


def _first(values: list, n: int = SHOWN) -> str:
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


@dataclass
class Scan:
    """What a layout scanner read: items per split, and problems (one line each)."""

    splits: dict[str, list[Item]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    problems: list[str] = field(default_factory=list)

    def raise_problems(self) -> None:
        if self.problems:
            raise UserError(*self.problems)
