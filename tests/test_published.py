"""A paper's average over datasets (``Published.average``): declared in code or in a
plug-in's published.yaml, shown by ``--paper`` in the average cells of a table over
exactly those datasets."""

from __future__ import annotations

import textwrap

import pytest

from vlprompt_core.api import ContractError, Published
from vlprompt_core.report import PaperNumbers
from vlprompt_core.report.collect import Group, Pair
from vlprompt_core.report.tables import build_tables

#: MaPLe's base-to-novel averages over its 11 datasets (muzairkhattak/multimodal-prompt-learning README).
ELEVEN = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
          "sun397", "dtd", "eurosat", "ucf101"]


def pairs(protocol: str, datasets: list[str], summary: dict[str, float], name: str = "mymethod") -> list[Pair]:
    return [Pair(Group(protocol, d, "ViT-B-16", 16, ()), name, name, "k", 1, dict(summary), None, "")
            for d in datasets]


def average_row(protocol: str, datasets: list[str], summary: dict[str, float], published) -> list:
    found = pairs(protocol, datasets, summary)
    tables = build_tables(found, {id(p): p.label for p in found}, PaperNumbers({"mymethod": published}))
    (table, _), _cost = tables
    return table.rows["mymethod"]


def test_a_published_average_is_shown_beside_the_measured_average_over_the_same_datasets():
    maple = (Published.average("base2novel", ELEVEN, {"base": 82.28, "novel": 75.14, "H": 78.55}, shots=16),)
    summary = {"base": 80.0, "novel": 70.0, "H": 74.67}
    row = average_row("base2novel", ELEVEN, summary, maple)
    base, novel, h = row[-3:]
    assert (base.published, novel.published, h.published) == (82.28, 75.14, 78.55)
    assert h.text().endswith("(paper 78.55, -3.88)")
    assert all(c.published is None for c in row[:-3])  # no per-dataset numbers were declared
    # an average over other datasets than the table's is not the paper's average
    assert all(c.published is None for c in average_row("base2novel", ELEVEN[:3], summary, maple)[-3:])


def test_a_few_shot_average_and_the_per_dataset_cells_side_by_side():
    published = (Published("few_shot", "dtd", {"accuracy": 60.0}, shots=16),
                 Published.average("few_shot", ["eurosat", "dtd"], {"accuracy": 70.0}, shots=16))
    row = average_row("few_shot", ["dtd", "eurosat"], {"accuracy": 65.0}, published)
    assert [c.published for c in row] == [60.0, None, 70.0]  # dtd, eurosat, average


def test_an_average_names_its_datasets_and_only_an_average_does():
    with pytest.raises(ContractError):
        Published("base2novel", "average", {"H": 1.0})
    with pytest.raises(ContractError):
        Published.average("base2novel", [], {"H": 1.0})
    assert Published.average("few_shot", ["b", "a", "a"], {"accuracy": 1.0}).over == ("a", "b")


def test_published_yaml_declares_an_average(tmp_path, monkeypatch):
    package = tmp_path / "paper_numbers_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "published.yaml").write_text(textwrap.dedent("""
        tables:
          - source: "MaPLe README"
            protocol: base2novel
            shots: 16
            results:
              dtd: {base: 80.36, novel: 59.18, H: 68.16}
            average: {base: 82.28, novel: 75.14, H: 78.55}
            average_over: [imagenet, caltech101, oxford_pets, stanford_cars, oxford_flowers, food101,
                           fgvc_aircraft, sun397, dtd, eurosat, ucf101]
          - source: "a table whose average is over its own datasets"
            protocol: few_shot
            shots: 4
            results: {dtd: {accuracy: 50.0}, eurosat: {accuracy: 70.0}}
            average: {accuracy: 60.0}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = Published.load("paper_numbers_pkg")
    averages = [p for p in loaded if p.over]
    assert [p.dataset for p in loaded if not p.over] == ["dtd", "dtd", "eurosat"]
    assert averages[0].over == tuple(sorted(ELEVEN)) and averages[0].metrics["H"] == 78.55
    assert averages[0].source == "MaPLe README" and averages[0].shots == 16
    assert averages[1].over == ("dtd", "eurosat") and averages[1].metrics == {"accuracy": 60.0}
