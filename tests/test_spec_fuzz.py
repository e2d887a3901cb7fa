"""Malformed run specs through the CLI (in process): whatever a spec file holds,
``vlprompt validate`` / ``run`` answer with exit code 2 and one ``error:`` line per
problem (or accept it), never a traceback.

Hypothesis mutates a valid spec (drops and inserts keys, replaces values with
values of other types, huge, negative or non-finite numbers, markup, control
characters, deep nesting, YAML tags and alias bombs) or writes random bytes or
text. 60 examples by default; ``VLPROMPT_STRESS=1`` runs 500.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from vlprompt_core.cli import app

STRESS = os.environ.get("VLPROMPT_STRESS") == "1"
EXAMPLES = 500 if STRESS else 60


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[dict, Path]:
    """A valid spec (the embedded backbone, a two-class folder of images) and a
    folder for the files the tests write."""
    root = tmp_path_factory.mktemp("fuzz")
    for c in ("cat", "dog"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "data" / c / f"{i}.png")
    spec = {
        "backbone": {"name": "open_clip"},
        "method": [{"name": "zeroshot"}, {"name": "coop", "n_ctx": 2}],
        "dataset": {"name": "folder", "path": str(root / "data")},
        "protocol": {"name": "few_shot", "shots": 1},
        "train": {"epochs": 1, "batch_size": 4, "seeds": [1], "lr": 0.002, "crop_scale": [0.5, 1.0]},
        "output": str(root / "out"),
    }
    (root / "specs").mkdir()
    return spec, root


def invoke(command: str, path: Path):
    return CliRunner().invoke(app, [command, str(path)])


def assert_clean(result, expect_error: bool | None = None) -> list[str]:
    """Exit code 0 or 2, no traceback, every stderr line an ``error:`` or ``warning:``;
    returns the error lines."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.split("\n") if line.strip()]
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert (result.exit_code == 2) == bool(errors), (result.exit_code, lines)
    if expect_error is not None:
        assert (result.exit_code == 2) == expect_error, result.output
    return errors


# --------------------------------------------------------------- strategies

#: Placeholders replaced in the YAML text after dumping: what a dump cannot write (tags and
#: scalars YAML cannot construct, deep nesting, aliases).
DEEP, TAG, BOMB, CYCLE = "__deep__", "__tag__", "__bomb__", "__cycle__"
TAGS = ["!!python/object/apply:os.system ['echo hi']", "!!python/name:os.system", "!!binary aGVsbG8=",
        "!!set {a, b}", "!!omap [a: 1]", "!custom x", "!!timestamp 2001-12-14", "!!str 3", "!!float 1e999",
        "2001-02-30", "9" * 5000, "!!binary not-base64!"]
#: "Billion laughs": nine levels of nine aliases each, 9**9 values once expanded.
BOMB_YAML = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{below}'] * 9)}]\n" for below, name in zip("abcdefgh", "bcdefghi"))

ODD_NUMBERS = st.sampled_from([10**30, -(10**30), 2**63, 2**64 + 1, -1, 0, 1e308, -1e308, 1e-320,
                               float("inf"), float("-inf"), float("nan")])
ODD_TEXT = st.sampled_from(["", " ", "[/red]", "[bold]x[/bold]", ":smile:", "a\nb", "\x1b[2J", "\x00", "\u2028",
                            "~", "auto", "cuda:99999999999999999999", "../../etc/passwd", "/", "x" * 300,
                            "é" * 50, "all", "null", "yes"])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | ODD_NUMBERS | ODD_TEXT
KEYS = st.text(max_size=12) | ODD_TEXT | st.integers(-5, 5) | st.none() | st.booleans() | st.sampled_from(
    ["name", "epochs", "lr", "seeds", "n_ctx", "shots", "path", "model", "pretrained", "train", "label"])
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                    max_leaves=12)
VALUES = JSON | st.sampled_from([DEEP, TAG, BOMB, CYCLE])


def _places(node, at=()):
    """Every place in the spec: the path of keys / indices to it."""
    yield at
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _places(value, (*at, key))


def _parent(spec, at):
    node = spec
    for key in at[:-1]:
        node = node[key]
    return node


@st.composite
def mutated_spec(draw, spec: dict) -> bytes:
    """The YAML of ``spec`` after one to three random mutations."""
    spec = copy.deepcopy(spec)
    for _ in range(draw(st.integers(1, 3))):
        places = list(_places(spec))
        at = draw(st.sampled_from(places))
        op = draw(st.sampled_from(["drop", "insert", "replace", "replace"]))
        if op == "insert":
            node = _parent(spec, (*at, None))
            if isinstance(node, dict):
                node[draw(KEYS)] = draw(VALUES)
            elif isinstance(node, list):
                node.insert(draw(st.integers(0, len(node))), draw(VALUES))
            else:
                op = "replace"
        if not at:
            if op != "insert":
                spec = draw(VALUES)
            continue
        parent = _parent(spec, at)
        if op == "drop":
            del parent[at[-1]]
        elif op == "replace":
            parent[at[-1]] = draw(VALUES)
    text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=draw(st.booleans()))
    depth = draw(st.sampled_from([3, 40, 200, 5000, 100_000]))
    text = (text.replace(DEEP, "[" * depth + "]" * depth)
            .replace(TAG, draw(st.sampled_from(TAGS)))
            .replace(BOMB, "{" + BOMB_YAML.replace("\n", ", ") + "}")
            .replace(CYCLE, "&loop [*loop, [*loop]]"))
    return text.encode()


@st.composite
def damaged_text(draw, spec: dict) -> bytes:
    """The YAML of ``spec`` cut short, or with random characters or bytes spliced in."""
    data = yaml.safe_dump(spec, sort_keys=False).encode()
    at = draw(st.integers(0, len(data)))
    how = draw(st.sampled_from(["cut", "text", "bytes"]))
    if how == "cut":
        return data[:at]
    junk = draw(st.text(min_size=1, max_size=8)).encode() if how == "text" else draw(st.binary(min_size=1, max_size=8))
    return data[:at] + junk + data[at:]


def spec_files(spec: dict):
    return (mutated_spec(spec) | mutated_spec(spec) | mutated_spec(spec) | damaged_text(spec)
            | st.binary(max_size=400) | st.text(max_size=400).map(str.encode))


_counter = itertools.count()


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=st.data())
def test_any_spec_file_gives_exit_0_or_2_and_error_lines_never_a_traceback(base, data):
    spec, root = base
    content = data.draw(spec_files(spec))
    path = root / "specs" / f"spec{next(_counter)}.yaml"
    path.write_bytes(content)
    result = invoke("validate", path)
    event(f"exit code {result.exit_code}")  # shown by --hypothesis-show-statistics
    assert_clean(result)


# ----------------------------------------------------- each case explicitly


def _spec_text(spec: dict, **changes) -> str:
    """``spec`` with sections changed (``train={...}`` merges into train; None drops)."""
    spec = copy.deepcopy(spec)
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        elif isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return yaml.safe_dump(spec, sort_keys=False)


#: name -> (what the file holds, from the base spec; words of the one error line)
CASES = {
    "yaml syntax": (lambda s: "method: [unclosed\n", "line 2: invalid YAML"),
    "wrong type": (lambda s: _spec_text(s, train={"epochs": "many"}), "train.epochs: Input should be a valid integer"),
    "unknown key": (lambda s: _spec_text(s, surprise=1), "surprise: unknown key"),
    "unknown nested key": (lambda s: _spec_text(s, train={"epochz": 1}), "train.epochz: unknown key"),
    "huge epochs": (lambda s: _spec_text(s, train={"epochs": 10**30}), "train.epochs: Input should be less than"),
    "negative batch": (lambda s: _spec_text(s, train={"batch_size": -4}), "train.batch_size: Input should be greater"),
    "huge batch": (lambda s: _spec_text(s, train={"batch_size": 2**40}), "train.batch_size: Input should be less"),
    "too many seeds": (lambda s: _spec_text(s, train={"seeds": list(range(1001))}),
                       "train.seeds: List should have at most 1000 items"),
    "huge seed": (lambda s: _spec_text(s, train={"seeds": [2**70]}), "train.seeds[0]: Input should be less than"),
    "negative seed": (lambda s: _spec_text(s, train={"seeds": [-1]}), "train.seeds[0]: Input should be greater"),
    "huge augment_views": (lambda s: _spec_text(s, train={"augment_views": 10**9}), "train.augment_views:"),
    "huge num_workers": (lambda s: _spec_text(s, train={"num_workers": 10**6}), "train.num_workers:"),
    "huge text_chunk": (lambda s: _spec_text(s, train={"text_chunk": 10**12}), "train.text_chunk:"),
    "infinite lr": (lambda s: _spec_text(s).replace("lr: 0.002", "lr: .inf"),
                    "train.lr: Input should be a finite number"),
    "nan lr": (lambda s: _spec_text(s).replace("lr: 0.002", "lr: .nan"), "train.lr: Input should be a finite number"),
    "infinite method option": (lambda s: _spec_text(s, method=[{"name": "coop", "init_std": float("inf")}]),
                               "method[0].init_std: Input should be a finite number"),
    "infinite override": (lambda s: _spec_text(s, method=[{"name": "coop", "train": {"lr": float("inf")}}]),
                          "Input should be a finite number"),
    "bad device": (lambda s: _spec_text(s, train={"device": "banana"}), "train.device: Value error, needs 'auto'"),
    "deep nesting": (lambda s: "method: " + "[" * 100_000 + "]" * 100_000 + "\n", "invalid YAML (nested too deeply)"),
    "nesting below the parser's limit": (lambda s: _spec_text(s, train={"seeds": "DEEP"}).replace(
        "DEEP", "[" * 60 + "]" * 60), "nested more than 32 levels deep"),
    "binary": (lambda s: bytes(range(256)) * 4, "not a text file (no UTF-8 at byte 128)"),
    "latin-1 text": (lambda s: (_spec_text(s) + "# caf\u00e9\n").encode("latin-1"), "not a text file"),
    "NUL character": (lambda s: "method: coop\x00\n", "invalid YAML (unacceptable character #x0000"),
    "empty": (lambda s: "", "the file is empty"),
    "only comments": (lambda s: "# nothing here\n", "the file is empty"),
    "a list": (lambda s: "- method\n- dataset\n", "the spec must be a mapping of sections"),
    "a scalar": (lambda s: "hello\n", "the spec must be a mapping of sections"),
    "impossible date": (lambda s: "output: 2001-02-30\n", "invalid YAML value (day is out of range for month)"),
    "5000-digit number": (lambda s: "output: " + "9" * 5000 + "\n", "invalid YAML value (Exceeds the limit"),
    "two documents": (lambda s: "method: coop\n---\nmethod: coop\n",
                      "invalid YAML (expected a single document in the stream, but found another document)"),
    "alias bomb": (lambda s: BOMB_YAML, "more than 100,000 values (with YAML aliases expanded)"),
    "alias cycle": (lambda s: "method: &loop [*loop]\n", "nested more than 32 levels deep"),  # endlessly
    "python tag": (lambda s: "method: !!python/object/apply:os.system ['touch pwned']\n",
                   "invalid YAML (could not determine a constructor for the tag"),
    "unhashable key": (lambda s: "? [a, b]\n: 1\n", "invalid YAML (while constructing a mapping, found unhashable key)"),
    "integer key": (lambda s: _spec_text(s) + "7: seven\n", "7: Keys should be strings"),
    "null key": (lambda s: _spec_text(s) + "null: nothing\n", "None: Keys should be strings"),
    "markup in a key": (lambda s: _spec_text(s) + "'[/red]': 1\n", "[/red]: unknown key"),
    "escape sequence in a key": (lambda s: _spec_text(s) + '"a\\nb\\e[2J": 1\n', "a\\nb\\x1b[2J: unknown key"),
    "too large": (lambda s: "# " + "x" * (1 << 20) + "\n", "larger than 1 MiB"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_malformed_spec_is_one_error_line(case, command, base):
    spec, root = base
    make, words = CASES[case]
    content = make(spec)
    path = root / "specs" / f"{case.replace(' ', '_')}.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    errors = assert_clean(invoke(command, path), expect_error=True)
    assert len(errors) == 1 and words in errors[0], (words, errors)
    assert errors[0].startswith(f"error: {path}: ")
    assert not (root / "out").exists()


def test_a_folder_or_a_fifo_instead_of_a_spec_file(base, tmp_path):
    folder = tmp_path / "spec.yaml"
    folder.mkdir()
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path, words in ((folder, "a folder, not a spec file"), (fifo, "not a regular file"),
                        (tmp_path / "absent.yaml", "spec file not found")):
        errors = assert_clean(invoke("validate", path), expect_error=True)
        assert errors == [f"error: {path}: {words}"]


@pytest.mark.parametrize("key", ["output", "train.feature_cache"])
@pytest.mark.parametrize("where", ["file", "below a file"])
def test_folders_written_must_not_be_files(where, key, base, tmp_path):
    spec, _ = base
    taken = tmp_path / "results"
    taken.write_text("not a folder\n")
    folder = taken if where == "file" else taken / "run1"
    path = tmp_path / "spec.yaml"
    path.write_text(_spec_text(spec, **({"output": str(folder)} if key == "output"
                                        else {"train": {"feature_cache": str(folder)}})))
    want = (f"{taken} is a file, not a folder" if where == "file"
            else f"{taken} is a file, so the folder {folder} cannot be made in it")
    for command in ("validate", "run"):
        errors = assert_clean(invoke(command, path), expect_error=True)
        assert errors == [f"error: {path}: {key}: {want}"]


def test_markup_in_a_label_is_printed_as_written(base, tmp_path):
    spec, _ = base
    path = tmp_path / "spec.yaml"
    path.write_text(_spec_text(spec, method=[{"name": "coop", "label": "[bold]mine[/bold] [/red]"}]))
    result = invoke("validate", path)
    assert_clean(result, expect_error=False)
    assert "[bold]mine[/bold] [/red]" in result.stdout
