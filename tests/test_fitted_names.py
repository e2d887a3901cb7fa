"""The fitted class names of :mod:`vlprompt_core.prompting.fitted_names`: their checkpoint
encoding (pinned byte for byte, so that checkpoints written before still read back) and the
mapping of the classes asked for to the fitted rows, which linear_probe and lp_plus_plus
score by (tip_adapter stores its cache's names the same way)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vlprompt_core.errors import UserError
from vlprompt_core.prompting import names_of, names_tensor, rows_by_name


def never(unknown: list[str]) -> str:
    raise AssertionError(f"refused {unknown}, though every name was fitted")


# ------------------------------------------------------------------ the checkpoint's bytes


def test_names_are_the_utf8_bytes_of_their_json_list_non_ascii_escaped():
    """The format checkpoints hold: ``json.dumps`` with its defaults (", " between items,
    non-ASCII as \\uXXXX escapes), as uint8. A change of separator, escaping or dtype fails."""
    t = names_tensor(["a b", "é"])
    assert t.dtype == torch.uint8 and t.dim() == 1 and t.device.type == "cpu"
    assert bytes(t.tolist()) == b'["a b", "\\u00e9"]'
    assert names_tensor([]).tolist() == [91, 93]  # b"[]"
    assert names_tensor(("x",)).tolist() == [91, 34, 120, 34, 93]  # any sequence: b'["x"]'


@pytest.mark.parametrize("names", [
    [], ["red"], ["missile", "tank", "missile"], ["é", "日本", "😀", '"q"', "back\\slash", "new\nline", ""],
])
def test_names_read_back_as_written(names):
    """Round trip, non-ASCII (a character outside the BMP too), quotes, escapes, an empty
    name and no names at all included."""
    assert names_of(names_tensor(names)) == names


def test_names_read_from_bytes_written_before_and_from_raw_utf8():
    """Bytes as an older checkpoint holds them read back; so do unescaped UTF-8 bytes (the
    decoding is UTF-8, not ASCII), and an empty tensor is no names."""
    old = torch.tensor(list(b'["missile", "\\u00e9t\\u00e9"]'), dtype=torch.uint8)
    assert names_of(old) == ["missile", "été"]
    assert names_of(torch.tensor(list('["été"]'.encode("utf-8")), dtype=torch.uint8)) == ["été"]
    assert names_of(torch.zeros(0, dtype=torch.uint8)) == []


# ------------------------------------------------------------------ rows by name


def test_the_fitted_classes_in_any_order_or_some_of_them():
    fitted = ["a", "b", "c", "d"]
    assert rows_by_name(fitted, fitted, never) == [0, 1, 2, 3]
    assert rows_by_name(("a", "b", "c", "d"), fitted, never) == [0, 1, 2, 3]  # any sequence
    assert rows_by_name(["d", "c", "b", "a"], fitted, never) == [3, 2, 1, 0]
    assert rows_by_name(["c", "a"], fitted, never) == [2, 0]
    assert rows_by_name([], fitted, never) == []
    assert rows_by_name([], [], never) == []


def test_a_repeated_name_takes_its_rows_in_order():
    """ImageNet's 'missile' (labels 657 and 744): the k-th asked for is the k-th fitted; asked
    for more often than fitted, the last row again."""
    fitted = ["missile", "tank", "missile", "boat"]
    assert rows_by_name(["missile"], fitted, never) == [0]  # ImageNet-R holds 657 only, the first
    assert rows_by_name(["boat", "missile"], fitted, never) == [3, 0]
    assert rows_by_name(["missile", "boat", "missile"], fitted, never) == [0, 3, 2]
    assert rows_by_name(["missile", "missile", "missile"], fitted, never) == [0, 2, 2]
    assert rows_by_name(["tank", "tank"], fitted, never) == [1, 1]


def test_names_not_fitted_are_refused_in_the_callers_words():
    """One problem, the caller's message exactly; the caller gets the unknown names once
    each, in the order they are first asked for."""
    asked: list[list[str]] = []

    def refuse(unknown: list[str]) -> str:
        asked.append(unknown)
        return f"{', '.join(unknown)}: not fitted"

    with pytest.raises(UserError) as exc:
        rows_by_name(["y", "a", "x", "y", "b"], ["a", "b"], refuse)
    assert exc.value.problems == ["y, x: not fitted"] and str(exc.value) == "y, x: not fitted"
    assert asked == [["y", "x"]]
    with pytest.raises(UserError, match="^a: not fitted$"):
        rows_by_name(["a"], [], refuse)
    with pytest.raises(UserError, match="^A: not fitted$"):  # names are case-sensitive
        rows_by_name(["A"], ["a"], refuse)


@given(st.lists(st.sampled_from(["missile", "tank", "é", "a b", ""]), max_size=12).flatmap(
    lambda fitted: st.tuples(st.just(fitted), st.permutations(fitted), st.integers(0, len(fitted)))))
def test_permutations_and_subsets_of_names_with_repeats(case):
    """Asked for a permutation of the fitted names (repeats included), each row comes back
    once, each naming the class asked for, and a repeated name's rows in order; asked for
    the first k of that permutation, each name gets the first of its fitted rows, in order."""
    fitted, names, k = case
    rows = rows_by_name(names, fitted, never)
    assert sorted(rows) == list(range(len(fitted)))
    assert [fitted[r] for r in rows] == names
    for name in set(names):
        theirs = [r for r, n in zip(rows, names) if n == name]
        assert theirs == [r for r, n in enumerate(fitted) if n == name]
    some = rows_by_name(names[:k], fitted, never)
    for name in set(names[:k]):
        theirs = [r for r, n in zip(some, names[:k]) if n == name]
        assert theirs == [r for r, n in enumerate(fitted) if n == name][:len(theirs)]
    assert [fitted[r] for r in some] == names[:k]
