"""The class names a method was fitted on, kept with what it fitted.

A method whose fit has a row per training class (a linear probe's weights, LP++'s
prototypes, Tip-Adapter's cache labels) keeps the names of those classes in a fitted
buffer, so that a checkpoint holds them and a loaded method scores its classes by name:

* :func:`names_tensor` — the names as a byte tensor (``uint8``: the UTF-8 bytes of their
  JSON list, ``json.dumps`` defaults), the checkpoint's encoding; :func:`names_of` reads
  them back.
* :func:`rows_by_name` — the fitted row of each class asked for (in any order, or some of
  them; a name repeated takes its rows in order), refusing names not fitted with a
  one-line :class:`~vlprompt_core.errors.UserError` the caller words.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from ..errors import UserError

__all__ = ["names_of", "names_tensor", "rows_by_name"]


def names_tensor(names: Sequence[str]) -> torch.Tensor:
    """``names`` as a 1-D ``uint8`` tensor on the CPU: the UTF-8 bytes of ``json.dumps(list(names))``
    (non-ASCII escaped as ``\\uXXXX``), so that a checkpoint holds them. The bytes are the
    checkpoint format: checkpoints written before this module must still read back."""
    return torch.tensor(list(json.dumps(list(names)).encode("utf-8")), dtype=torch.uint8)


def names_of(tensor: torch.Tensor) -> list[str]:
    """The names :func:`names_tensor` encoded (on any device); an empty tensor is no names."""
    return json.loads(bytes(tensor.cpu().tolist()).decode("utf-8")) if tensor.numel() else []


def rows_by_name(names: Sequence[str], fitted: Sequence[str], refuse: Callable[[list[str]], str]) -> list[int]:
    """The row among ``fitted`` of each of ``names`` (the fitted classes in any order, or some
    of them). A name ``fitted`` repeats (ImageNet's 'missile', labels 657 and 744) takes its
    rows in order, its k-th occurrence in ``names`` the k-th row; asked for more often than
    fitted, it takes its last row again.

    Names not among ``fitted`` are a :class:`UserError` whose one problem is
    ``refuse(unknown)``: ``unknown`` lists them once each, in the order ``names`` first gives
    them (the caller words the message, and knows ``names`` and ``fitted`` to count them)."""
    if list(names) == list(fitted):
        return list(range(len(fitted)))
    where: dict[str, list[int]] = defaultdict(list)
    for row, name in enumerate(fitted):
        where[name].append(row)
    unknown = list(dict.fromkeys(n for n in names if n not in where))
    if unknown:
        raise UserError(refuse(unknown))
    rows, seen = [], defaultdict(int)
    for name in names:
        found = where[name]
        rows.append(found[min(seen[name], len(found) - 1)])
        seen[name] += 1
    return rows
