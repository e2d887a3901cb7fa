"""The run spec: one line per problem, each naming its field; overrides; schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from vlprompt_core.errors import UserError
from vlprompt_core.spec import TrainSpec, build_spec_model, load_spec, resolve_methods, validate_spec


@pytest.fixture()
def base(world):
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "coop", "n_ctx": 4},
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        "train": {"epochs": 3, "batch_size": 8, "seeds": [1]},
    }


def problems(data, registry, source="spec") -> list[str]:
    with pytest.raises(UserError) as exc:
        validate_spec(data, registry, source)
    return exc.value.problems


def with_(base, **changes):
    data = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split("__")
        for key in path:
            node = node[key]
        node[last] = value
    return data


# ------------------------------------------------------------------- valid


def test_valid_spec(base, registry):
    spec = validate_spec(base, registry)
    assert [m.name for m in spec.method] == ["coop"]
    assert spec.method[0].n_ctx == 4
    assert spec.train.epochs == 3 and spec.train.lr == 0.002  # defaults kept
    assert spec.dataset.root == Path(base["dataset"]["root"])
    assert spec.protocol.shots == 2


# ------------------------------------------------------------------ errors


def test_unknown_method_key(base, registry):
    lines = problems(with_(base, method__n_ctxx=4), registry)
    assert lines == ["spec: method.n_ctxx: unknown key"]


def test_unknown_key_in_a_method_list_names_the_entry(base, registry):
    data = with_(base, method=[{"name": "zeroshot"}, {"name": "coop", "n_ctxx": 4}])
    assert problems(data, registry) == ["spec: method[1].n_ctxx: unknown key"]


def test_wrong_type(base, registry):
    lines = problems(with_(base, train__epochs="ten"), registry)
    assert len(lines) == 1
    assert lines[0].startswith("spec: train.epochs: ")
    assert "integer" in lines[0]


def test_unknown_method_name_lists_registered_names(base, registry):
    lines = problems(with_(base, method={"name": "coopp"}), registry)
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("spec: method.name: ")
    assert "'coopp'" in line
    for name in registry.names("method"):
        assert repr(name) in line
    assert "coop" in registry.names("method") and "zeroshot" in registry.names("method")


def test_unknown_protocol_name(base, registry):
    lines = problems(with_(base, protocol={"name": "fewshot"}), registry)
    assert len(lines) == 1 and lines[0].startswith("spec: protocol.name: ")
    assert "'few_shot'" in lines[0] and "'base2novel'" in lines[0]


def test_missing_dataset_folder(base, registry, tmp_path):
    missing = tmp_path / "nowhere"
    lines = problems(with_(base, dataset__root=str(missing)), registry)
    assert len(lines) == 1
    assert lines[0].startswith("spec: dataset.root: ")
    assert str(missing / "toy") in lines[0]


def test_csc_with_ctx_init_is_reported_on_the_method(base, registry):
    lines = problems(with_(base, method={"name": "coop", "csc": True, "ctx_init": "a photo of a"}), registry)
    assert len(lines) == 1 and lines[0].startswith("spec: method")
    assert "csc" in lines[0]


def test_bad_method_train_override(base, registry):
    assert problems(with_(base, method__train={"lrr": 1.0}), registry) == ["spec: method.train.lrr: unknown key"]
    lines = problems(with_(base, method__train={"seeds": [1]}), registry)
    assert lines == ["spec: method.train.seeds: unknown key"]  # seeds are per run, not per method


def test_multiple_problems_one_line_each(base, registry, tmp_path):
    data = with_(base, method__n_ctx=0, train__epochs="ten", backbone__modell="x",
                 dataset__root=str(tmp_path / "nope"))
    data["extra"] = 1
    lines = problems(data, registry, source="my.yaml")
    assert len(lines) == 5, lines
    assert all(line.startswith("my.yaml: ") for line in lines)
    paths = sorted(line.split(": ")[1] for line in lines)
    assert paths == ["backbone.modell", "dataset.root", "extra", "method.n_ctx", "train.epochs"]
    assert "my.yaml: extra: unknown key" in lines


def test_not_a_mapping(registry):
    for data in ([1, 2], None, "text"):
        lines = problems(data, registry)
        assert len(lines) == 1 and "must be a mapping" in lines[0]


def test_missing_sections(registry):
    lines = problems({"method": {"name": "coop"}}, registry)
    assert sorted(line.split(": ")[1] for line in lines) == ["dataset", "protocol"]


# -------------------------------------------------------------- load_spec


def test_invalid_yaml_reports_the_line(tmp_path, registry):
    path = tmp_path / "bad.yaml"
    path.write_text("method:\n  name: coop\n  n_ctx: [4\ndataset: {name: toy}\n")
    with pytest.raises(UserError) as exc:
        load_spec(path, registry)
    (line,) = exc.value.problems
    assert line.startswith(f"{path}: line 4: invalid YAML")

    path.write_text("method:\n  name: coop\n    n_ctx: 4\n")
    with pytest.raises(UserError) as exc:
        load_spec(path, registry)
    assert exc.value.problems[0].startswith(f"{path}: line 3: invalid YAML")


def test_missing_spec_file(tmp_path, registry):
    with pytest.raises(UserError, match="spec file not found"):
        load_spec(tmp_path / "none.yaml", registry)


def test_load_spec_names_the_file_and_defaults_output(base, tmp_path, registry):
    path = tmp_path / "exp1.yaml"
    path.write_text(yaml.safe_dump(base))
    spec = load_spec(path, registry)
    assert spec.output == Path("runs") / "exp1"
    path.write_text(yaml.safe_dump(with_(base, train__epochs="ten")))
    with pytest.raises(UserError) as exc:
        load_spec(path, registry)
    assert exc.value.problems[0].startswith(f"{path}: train.epochs: ")


# -------------------------------------------------------------- overrides


def test_per_method_overrides_beat_the_train_section(base, registry):
    data = with_(base, method=[
        {"name": "coop", "label": "fast", "train": {"epochs": 1, "lr": 0.01}},
        {"name": "coop", "n_ctx": 2},
    ])
    spec = validate_spec(data, registry)
    fast, plain = resolve_methods(spec, registry)
    t = fast.train
    assert (t.epochs, t.lr) == (1, 0.01)
    assert t.batch_size == 8 and t.seeds == [1]  # the rest from the run's train section
    assert t.momentum == TrainSpec().momentum
    assert (plain.train.epochs, plain.train.lr, plain.train.batch_size) == (3, 0.002, 8)
    assert fast.sources["train.epochs"] == fast.sources["train.batch_size"] == "spec"
    assert spec.train.epochs == 3 and spec.train.lr == 0.002  # the run's section is untouched
    assert fast.key != plain.key


def test_method_all_expands_to_every_method(base, registry):
    spec = validate_spec(with_(base, method="all"), registry)
    names = [m.name for m in spec.method]
    wrappers = [n for n in registry.names("method") if registry.get("method", n).wraps]  # they need a base
    assert sorted(names) == [n for n in registry.names("method") if n not in wrappers]
    assert names[0] == "zeroshot"


# ------------------------------------------------------------------ schema


def test_json_schema_covers_plugins(registry):
    schema = build_spec_model(registry).model_json_schema()
    defs = schema["$defs"]
    coop = defs["Method_coop"]["properties"]
    assert coop["n_ctx"]["default"] == 16 and coop["n_ctx"]["minimum"] == 1
    assert set(coop["class_token_position"]["enum"]) == {"end", "middle", "front"}
    protocol_defs = {k.removeprefix("Protocol_") for k in defs if k.startswith("Protocol_")}
    assert protocol_defs == set(registry.names("protocol"))
    assert {"few_shot", "base2novel", "cross_dataset", "domain_generalisation"} <= protocol_defs
    for name in registry.names("protocol"):
        assert defs[f"Protocol_{name}"]["properties"]["name"]["const"] == name
    assert "Dataset_toy" in defs
    assert "epochs" in defs["TrainSpec"]["properties"]
    assert set(schema["required"]) >= {"method", "dataset", "protocol"}


def test_the_spec_model_is_made_once_for_the_same_plugins_and_again_for_others(base, registry):
    """A spec model is reused for a registry of the same entries, never for one that
    holds another method (its name must validate there, and only there)."""
    import dataclasses

    from vlprompt_core.plugins import Registry

    assert build_spec_model(registry) is build_spec_model(registry)
    same = Registry(entries={k: dict(v) for k, v in registry.entries.items()}, sources=registry.sources)
    assert build_spec_model(same) is build_spec_model(registry)
    entries = {k: dict(v) for k, v in registry.entries.items()}
    entries["method"]["coop_again"] = dataclasses.replace(registry.get("method", "coop"), name="coop_again")
    sources = {**registry.sources, ("method", "coop_again"): registry.sources[("method", "coop")]}
    more = Registry(entries=entries, sources=sources)
    assert build_spec_model(more) is not build_spec_model(registry)
    assert validate_spec(with_(base, method={"name": "coop_again"}), more).method[0].name == "coop_again"
    with pytest.raises(UserError, match="coop_again"):
        validate_spec(with_(base, method={"name": "coop_again"}), registry)


def test_crop_scale_must_be_an_ordered_fraction(base, registry):
    assert TrainSpec().crop_scale == (0.08, 1.0)  # the reference transform by default
    base["train"]["crop_scale"] = [0.9, 0.5]
    assert problems(base, registry) == ["spec: train.crop_scale: Value error, needs 0 < low <= high <= 1"]


# ------------------------------------------- what validate tells of options on the backbone


def validate_cli(tmp_path, data) -> tuple[int, list[str], list[str]]:
    """``vlprompt validate`` of ``data``: exit code, stdout lines, error lines."""
    from typer.testing import CliRunner

    from vlprompt_core.cli import app

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "300"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return result.exit_code, result.stdout.splitlines(), errors


def test_validate_refuses_an_n_ctx_that_ctx_init_contradicts(base, registry, tmp_path):
    # today's CoOp would silently learn 4 vectors (one per token of the words), not 5
    code, _, errors = validate_cli(tmp_path, with_(base, method={"name": "coop", "n_ctx": 5,
                                                                 "ctx_init": "a photo of a"}))
    assert code == 2
    assert errors == [f"error: {tmp_path / 'spec.yaml'}: method 'coop': method.n_ctx: 5, but ctx_init 'a photo of "
                      "a' makes 4 context vectors (one per token); drop n_ctx, or set ctx_init: '' for 5 random "
                      "vectors"]
    # one line per section: CoCoOp's n_ctx against its default words, and CoOp's again
    code, _, errors = validate_cli(tmp_path, with_(base, method=[
        {"name": "cocoop", "n_ctx": 8}, {"name": "coop", "n_ctx": 2, "ctx_init": "a photo of a"}]))
    assert code == 2 and len(errors) == 2
    assert "method 'cocoop': method.n_ctx: 8, but ctx_init 'a photo of a' makes 4" in errors[0]
    assert "method 'coop': method.n_ctx: 2" in errors[1]


def test_validate_says_which_settings_a_method_uses_on_this_backbone(base, registry, tmp_path):
    code, out, errors = validate_cli(tmp_path, with_(base, method=[
        {"name": "coop", "ctx_init": "a photo of a"}, {"name": "provp", "prompt_depth": 9}, {"name": "cocoop"}]))
    assert code == 0 and not errors, errors
    # one line per change, its reason included (not said twice)
    assert [line for line in out if line.startswith(("coop:", "provp:", "coop uses", "provp uses"))] == [
        "coop: n_ctx 4: one context vector per token of ctx_init 'a photo of a'",
        "provp: prompt_depth 9 -> 2: the image tower has 2 blocks"]  # the tiny config's image tower has 2 blocks
    assert not [line for line in out if line.startswith(("cocoop uses", "cocoop:"))]  # as asked: nothing to say


def test_validate_resolves_the_used_settings_without_loading_weights(base, registry, monkeypatch):
    import open_clip

    def no_model(*args, **kwargs):
        raise AssertionError("validate made the model")

    monkeypatch.setattr(open_clip, "create_model", no_model)
    (m,) = resolve_methods(validate_spec(with_(base, method={"name": "provp", "prompt_depth": 9}), registry), registry)
    assert (m.options.prompt_depth, m.used.prompt_depth) == (9, 2)


def test_run_says_which_settings_a_method_uses_before_it_trains(base, registry, tmp_path):
    from typer.testing import CliRunner

    from vlprompt_core.cli import app

    data = with_(base, method={"name": "coop", "ctx_init": "a photo of a"}, protocol={"name": "few_shot", "shots": 1},
                 train={"epochs": 1, "batch_size": 8, "seeds": [1], "device": "cpu"}, output=str(tmp_path / "out"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    said = lines.index("coop: n_ctx 4: one context vector per token of ctx_init 'a photo of a'")
    assert not any("done in" in line for line in lines[:said])  # before any step is done
    import json

    described = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["coop"]
    assert (described["options"]["n_ctx"], described["used"]["n_ctx"]) == (16, 4)
