"""``vlprompt list``: readable in an 80-column terminal (and a wider one), every kind
listed, loggers included; ``--json`` unchanged in shape."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from vlprompt_core import hookimpl
from vlprompt_core.api import LoggerEntry, Options
from vlprompt_core.cli import app
from vlprompt_core.plugins import KINDS, build_registry, get_registry, make_plugin_manager


class Toy:
    """A logger with a long name and a description that looks like markup."""

    @hookimpl
    def vlprompt_loggers(self):
        return [LoggerEntry("a_logger_with_a_rather_long_name_indeed", Options,
                            "writes [bold]nothing[/bold] at all, but says so in a description long enough to wrap "
                            "twice in an eighty-column terminal window, which is what this test wants to see")]


def listing(columns: int, registry=None, monkeypatch=None) -> list[str]:
    if registry is not None:
        monkeypatch.setattr("vlprompt_core.plugins._REGISTRY", registry)
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": str(columns), "TERM": "xterm"})
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def rows(reg) -> list[tuple[str, str, str]]:
    return [(kind, name, reg.get(kind, name).description) for kind in KINDS for name in reg.names(kind)]


def first_words(text: str, n: int = 5) -> str:
    return " ".join(text.split()[:n])


def assert_readable(lines: list[str], reg, columns: int) -> None:
    assert lines and all(len(line) <= columns for line in lines), max(lines, key=len)
    text = "\n".join(lines)
    for kind in KINDS:
        assert re.search(rf"^{kind}s\s*$", text, re.M), kind
    for kind, name, description in rows(reg):
        assert any(re.match(rf"\s+{re.escape(name)}(\s|$)", line) for line in lines), name
        if description:
            assert any(first_words(description) in line for line in lines), description
        source = reg.sources[(kind, name)]
        origin = "built-in" if source.distribution == "vlprompt" else f"{source.distribution} {source.version}"
        assert any(line.strip() == origin or line.rstrip().endswith(f"  {origin}") for line in lines), origin


def test_80_columns_every_description_starts_on_one_line():
    lines = listing(80)
    assert_readable(lines, get_registry(), 80)
    text = "\n".join(lines)
    assert re.search(r"^  tensorboard\s+TensorBoard event files", text, re.M)
    assert re.search(r"^\s+vlprompt-plugin-tensorboard 0\.1\.0\s*$", text, re.M)


def test_120_columns_short_descriptions_fit_on_one_line():
    lines = listing(120)
    reg = get_registry()
    assert_readable(lines, reg, 120)
    for _, _, description in rows(reg):
        if len(description) <= 80:
            assert any(description in line for line in lines), description


def test_a_long_name_gets_its_own_line_and_plugin_text_is_not_markup(monkeypatch):
    monkeypatch.setenv("VLPROMPT_DISABLE_PLUGINS", "tensorboard")
    reg = build_registry(*make_plugin_manager(extra=(("toy", Toy()),)))
    lines = listing(80, reg, monkeypatch)
    assert_readable(lines, reg, 80)
    assert any("writes [bold]nothing[/bold] at all" in line for line in lines)  # verbatim


def test_a_kind_with_nothing_registered_says_so(monkeypatch):
    monkeypatch.setenv("VLPROMPT_DISABLE_PLUGINS", "tensorboard")
    reg = build_registry(*make_plugin_manager())
    assert reg.names("logger") == []
    lines = listing(80, reg, monkeypatch)
    after = lines[next(i for i, line in enumerate(lines) if line.strip() == "loggers") + 1]
    assert after.strip() == "(none)"


def test_json_lists_the_tensorboard_logger_with_its_distribution():
    result = CliRunner().invoke(app, ["list", "--json"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"registered", "failed"}
    row = next(r for r in data["registered"] if (r["kind"], r["name"]) == ("logger", "tensorboard"))
    assert row["distribution"] == "vlprompt-plugin-tensorboard" and row["version"] == "0.1.0"
    assert set(row) == {"kind", "name", "distribution", "version", "description"}
    assert {r["kind"] for r in data["registered"]} == set(KINDS)


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Tests that swap the process-wide registry put it back."""
    monkeypatch.setattr("vlprompt_core.plugins._REGISTRY", get_registry())
