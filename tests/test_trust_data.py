"""Results that can be trusted, as far as the data goes: a result is keyed by what the
datasets hold (a rerun after the data changed scores it again), classes are real
(no class without images, no two classes that read alike in a prompt, at least two
classes) and no prompt is cut to the text context -- said by ``validate`` and
``data check`` in one line each, refused by a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vlprompt_core import hookimpl
from vlprompt_core.api import ClassSet, DatasetEntry, DatasetSplits, Item, Options
from vlprompt_core.engine import Engine
from vlprompt_core.errors import UserError
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.prompting import PromptTable, PromptTemplate, class_text_features
from vlprompt_core.spec import validate_spec

#: A class name of about 40 tokens: over the tiny test model's text context of 32.
LONG = " ".join(["zebra"] * 34)


def images(folder: Path, n: int = 4, colour=(200, 30, 30)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), tuple((c + 17 * i) % 256 for c in colour)).save(folder / f"{i}.png")
    return folder


def class_folders(root: Path, classes, n: int = 4) -> Path:
    for k, c in enumerate(classes):
        images(root / c, n, (40 * k, 90, 200))
    return root


def run_spec(world, output, dataset, method=({"name": "zeroshot"},), protocol=None) -> dict:
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": list(method),
        "dataset": dataset,
        "protocol": protocol or {"name": "few_shot", "shots": 1},
        "train": {"epochs": 1, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32"},
        "output": str(output),
    }


def run(reg, data: dict):
    logs: list[str] = []
    record = Engine(validate_spec(data, reg), reg, log=logs.append).run()
    return record, [line for line in logs if not line.startswith("kernels:")]


def cli(*args):
    from typer.testing import CliRunner

    from vlprompt_core.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def spec_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------- 2. keyed by the data


def test_a_rerun_after_classes_were_added_scores_them_instead_of_reusing_the_old_result(world, registry, tmp_path):
    data = class_folders(tmp_path / "shapes", ["a", "b", "c"])
    spec = run_spec(world, tmp_path / "out", {"name": "folder", "path": str(data)})
    first, _ = run(registry, spec)

    again, logs = run(registry, spec)  # nothing changed: reused
    assert [line for line in logs if "already" in line] == ["zeroshot seed 1: already in "
                                                            f"{tmp_path / 'out' / 'results.json'}, skipped"]
    assert again["runs"] == first["runs"]

    class_folders(data, ["a", "b", "c", "d", "e"])  # two classes more
    second, logs = run(registry, spec)
    assert not [line for line in logs if "already" in line]
    assert second["runs"][0]["key"] != first["runs"][0]["key"]
    assert second["methods"]["zeroshot"]["key"] == second["runs"][0]["key"]
    aside = [p.name for p in (tmp_path / "out").glob("results.*.json")]
    assert len(aside) == 1  # the 3-class result is set aside, never pooled or overwritten


def test_a_changed_target_dataset_is_scored_again(world, registry, tmp_path):
    target = class_folders(tmp_path / "shapes", ["a", "b", "c"])
    protocol = {"name": "cross_dataset", "shots": 1, "targets": [{"name": "folder", "path": str(target)}]}
    spec = run_spec(world, tmp_path / "out", {"name": "toy", "root": str(world["data"])}, protocol=protocol)
    first, _ = run(registry, spec)
    _, logs = run(registry, spec)
    assert any("already in" in line for line in logs)

    (target / "c" / "3.png").unlink()  # one image fewer in the target
    second, logs = run(registry, spec)
    assert not [line for line in logs if "already" in line]
    assert second["runs"][0]["key"] != first["runs"][0]["key"]


# ------------------------------------------------- 3. phantom and duplicate classes


def test_an_empty_class_folder_is_refused_by_validate_data_check_and_run(world, registry, tmp_path):
    data = class_folders(tmp_path / "shapes", ["a", "b", "c"])
    (data / "d").mkdir()
    spec = spec_file(tmp_path, run_spec(world, tmp_path / "out", {"name": "folder", "path": str(data)}))
    for command in ("validate", "run"):
        result = cli(command, spec)
        assert result.exit_code == 2, result.output
        (line,) = errors(result)
        assert f"{data / 'd'}" in line and "no images" in line, line
        assert "Traceback" not in result.output
    result = cli("data", "check", spec)
    assert result.exit_code == 2
    assert any(f"{data / 'd'}" in line and "no images" in line for line in errors(result)), result.output


def test_an_empty_class_folder_of_a_spec_dataset_is_refused_by_validate(world, tmp_path, monkeypatch):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "shapes.yaml").write_text("name: shapes\nlayout: class_folders\nfolder: shapes\nimage_dir: .\n"
                                       "classnames: [a, b, c]\ntemplates: ['a photo of a {}.']\n")
    class_folders(tmp_path / "data" / "shapes", ["a", "b"])
    (tmp_path / "data" / "shapes" / "c").mkdir()
    _registry_with_specs(world, specs, monkeypatch)
    spec = spec_file(tmp_path, run_spec(world, tmp_path / "out", {"name": "shapes", "root": str(tmp_path / "data")}))
    result = cli("validate", spec)
    assert result.exit_code == 2, result.output
    (line,) = errors(result)
    assert "no images" in line and "c" in line


def _registry_with_specs(world, specs: Path, monkeypatch):
    import os

    import vlprompt_core.plugins as plugins

    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", os.pathsep.join([str(world["specs"]), str(specs)]))
    return plugins.get_registry(refresh=True)


@pytest.mark.parametrize("layout", ["classnames", "folders", "csv", "json"])
def test_classes_that_read_alike_in_a_prompt_are_refused_in_one_line(world, registry, tmp_path, layout):
    if layout == "classnames":  # a class listed twice: the second would have no images
        data = class_folders(tmp_path / "shapes", ["x", "y", "z"])
        dataset = {"name": "folder", "path": str(data), "classnames": ["x", "x", "y", "z"]}
        named = ["'x'"]
    elif layout == "folders":
        data = class_folders(tmp_path / "shapes", ["red circle", "red_circle", "square"])
        dataset = {"name": "folder", "path": str(data)}
        named = ["'red circle'", "'red_circle'"]
    else:
        class_folders(tmp_path / "imgs", ["p", "q", "r", "s"])
        rows = [("imgs/p/0.png", "cat"), ("imgs/p/1.png", "cat"), ("imgs/q/0.png", "Cat"), ("imgs/q/1.png", "Cat"),
                ("imgs/r/0.png", "cat "), ("imgs/r/1.png", "cat "), ("imgs/s/0.png", "dog"), ("imgs/s/1.png", "dog")]
        if layout == "csv":
            path = tmp_path / "mine.csv"
            path.write_text("path,class\n" + "".join(f"{p},{c}\n" for p, c in rows))
        else:
            path = tmp_path / "mine.json"
            path.write_text(json.dumps([{"path": p, "class": c} for p, c in rows]))
        dataset = {"name": layout, "path": str(path)}
        named = ["'cat'", "'Cat'", "'cat '"]
    spec = spec_file(tmp_path, run_spec(world, tmp_path / "out", dataset))
    for command in ("validate", "run"):
        result = cli(command, spec)
        assert result.exit_code == 2, result.output
        (line,) = errors(result)
        assert all(n in line for n in named), line
    result = cli("data", "check", spec)
    assert result.exit_code == 2 and any(all(n in line for n in named) for line in errors(result)), result.output


def test_classes_of_a_split_file_that_read_alike_are_refused(tmp_path, registry):
    class_folders(tmp_path / "imgs", ["a", "b"], n=2)
    split = {"train": [["imgs/a/0.png", 0, "Apple pie"], ["imgs/b/0.png", 1, "apple_pie"]], "val": [],
             "test": [["imgs/a/1.png", 0, "Apple pie"], ["imgs/b/1.png", 1, "apple_pie"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    entry = registry.get("dataset", "json")
    with pytest.raises(UserError, match="'Apple pie' and 'apple_pie'"):
        entry.load(entry.options(path=tmp_path / "split.json"))


class PhantomData:
    """A dataset plug-in (no check of its own) whose class list has a class without
    images, or only one class."""

    def __init__(self, names, folder: Path):
        self.names, self.folder = names, folder

    @hookimpl
    def vlprompt_datasets(self):
        def load(opts):
            items = [Item(p, 0) for p in sorted(images(self.folder).iterdir())]
            return DatasetSplits("phantom", ClassSet(self.names), items[:2], [], items[2:])

        return [DatasetEntry("phantom", Options, load, "test: a class without images")]


@pytest.mark.parametrize("names, problem", [(["a", "b"], "no images: 'b'"), (["a"], "1 class.*at least 2")])
def test_a_run_refuses_a_dataset_with_a_class_without_images_or_a_single_class(world, tmp_path, names, problem):
    reg = build_registry(*make_plugin_manager(extra=(("phantom", PhantomData(names, tmp_path / "imgs")),)))
    with pytest.raises(UserError, match=problem):
        run(reg, run_spec(world, tmp_path / "out", {"name": "phantom"}))


# ------------------------------------------------------------- 12. one class


@pytest.mark.parametrize("layout", ["folder", "csv", "spec file"])
def test_a_one_class_dataset_is_refused_by_validate_and_run(world, tmp_path, monkeypatch, layout):
    data = class_folders(tmp_path / "data" / "shapes", ["a"])
    specs = tmp_path / "specs"
    specs.mkdir()
    if layout == "folder":
        dataset = {"name": "folder", "path": str(data)}
    elif layout == "csv":
        (tmp_path / "one.csv").write_text("path,class\n" + "".join(f"data/shapes/a/{i}.png,a\n" for i in range(4)))
        dataset = {"name": "csv", "path": str(tmp_path / "one.csv")}
    else:
        (specs / "shapes.yaml").write_text("name: shapes\nlayout: class_folders\nfolder: shapes\nimage_dir: .\n"
                                           "classnames: [a]\n")
        dataset = {"name": "shapes", "root": str(tmp_path / "data")}
    _registry_with_specs(world, specs, monkeypatch)
    spec = spec_file(tmp_path, run_spec(world, tmp_path / "out", dataset))
    for command in ("validate", "run"):
        result = cli(command, spec)
        assert result.exit_code == 2, result.output
        (line,) = errors(result)
        assert "1 class" in line and "at least 2" in line, line
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_run_refuses_to_score_a_one_class_half_of_base_to_novel(world, registry, tmp_path):
    data = class_folders(tmp_path / "shapes", ["a", "b", "c"])  # base: a, b; novel: c alone
    spec = run_spec(world, tmp_path / "out", {"name": "folder", "path": str(data)},
                    protocol={"name": "base2novel", "shots": 1})
    with pytest.raises(UserError) as exc:
        run(registry, spec)
    (line,) = exc.value.problems
    assert line.startswith("protocol base2novel: scores 1 class ('c') in evaluation set 'novel'"), line
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["status"] == "failed" and record["error"] == line


# ---------------------------------------------------------- 6. prompts too long


def test_hand_written_prompts_longer_than_the_context_are_refused_naming_the_class(tiny_backbone):
    with pytest.raises(UserError) as exc:
        class_text_features(tiny_backbone, ["cat", LONG], ["a photo of a {}."])
    (line,) = exc.value.problems
    assert f"class {LONG!r}" in line and "text context of 32" in line and "tokens" in line, line


def test_learned_prompts_longer_than_the_context_are_refused_naming_the_class(tiny_backbone):
    name = " ".join(["zebra"] * 20)  # fits a hand-written prompt, not one with 16 context vectors
    class_text_features(tiny_backbone, [name], ["a photo of a {}."])
    with pytest.raises(UserError) as exc:
        PromptTable(tiny_backbone, ["cat", name], PromptTemplate.with_context(16))
    (line,) = exc.value.problems
    assert f"class {name!r}" in line and "text context of 32" in line and "context vectors" in line, line


def test_provp_refuses_a_prompt_longer_than_the_context(tiny_backbone, registry):
    entry = registry.get("method", "provp")
    with pytest.raises(UserError, match=f"class {LONG!r}"):
        entry.build(tiny_backbone, ClassSet(["cat", LONG]), entry.options())


@pytest.mark.parametrize("where", ["class name", "template"])
def test_validate_and_data_check_say_a_prompt_is_longer_than_the_context(world, registry, tmp_path, where):
    if where == "class name":
        data = class_folders(tmp_path / "shapes", ["cat", LONG])
        method = {"name": "zeroshot"}
        named = f"class {LONG!r}"
    else:
        data = class_folders(tmp_path / "shapes", ["cat", "dog"])
        method = {"name": "zeroshot", "templates": [f"a photo of a {{}}, {LONG}."]}
        named = "class 'cat'"
    spec = spec_file(tmp_path, run_spec(world, tmp_path / "out", {"name": "folder", "path": str(data)}, [method]))
    for command in ("validate", "run"):
        result = cli(command, spec)
        assert result.exit_code == 2, result.output
        (line,) = errors(result)
        assert named in line and "text context of 32" in line, line
    if where == "class name":
        result = cli("data", "check", spec)
        assert result.exit_code == 2 and any(named in line for line in errors(result)), result.output
