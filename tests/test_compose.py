"""A method that wraps another (``MethodRef``): the wrapped section validated as its own
method's, the schema's nesting, recipes combined, results keys and records and
checkpoints holding both, a base without what the wrapper needs refused, and the example
in docs/writing-plugins.md."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlprompt_core.api import BackboneInfo, Batch, ClassSet
from vlprompt_core.errors import UserError
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.spec import build_spec_model, resolve_methods, validate_spec

DOCS = Path(__file__).resolve().parents[1] / "docs"
BACKBONE = {"name": "open_clip", "model": "vlprompt_tiny", "pretrained": "embedded"}
NAMES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def reg():
    reg = build_registry(*make_plugin_manager())
    missing = {"coop", "kgcoop", "dept", "prograd"} - set(reg.names("method"))
    if missing:
        pytest.skip(f"needs the plug-ins of {sorted(missing)} installed")
    return reg


def spec(reg, *methods, **extra):
    return validate_spec({"backbone": BACKBONE, "method": list(methods), "dataset": {"name": "embedded_objects"},
                          "protocol": {"name": "base2novel", "shots": 2}, **extra}, reg)


def test_the_schema_nests_every_plain_method_under_base(reg):
    schema = build_spec_model(reg).model_json_schema()
    defs = schema["$defs"]
    base = defs["Method_dept"]["properties"]["base"]
    named = {ref["$ref"].rsplit("/", 1)[1] for ref in base["oneOf"]}
    assert {"Wrapped_coop", "Wrapped_kgcoop", "Wrapped_prograd"} <= named
    assert "Wrapped_dept" not in named  # a wrapper cannot be wrapped
    assert "kg_weight" in defs["Wrapped_kgcoop"]["properties"]
    assert "base" in defs["Method_dept"]["required"]


def test_the_wrapped_section_is_validated_as_its_own_methods(reg):
    with pytest.raises(UserError) as exc:
        spec(reg, {"name": "dept", "base": {"name": "kgcoop", "lambda_kg": 8, "n_ctx": 0}},
             {"name": "dept", "base": {"name": "nosuch"}}, {"name": "dept", "base": {"name": "dept"}})
    problems = exc.value.problems
    assert "spec: method[0].base.lambda_kg: unknown key" in problems
    assert any(p.startswith("spec: method[0].base.n_ctx: Input should be greater than or equal to 1") for p in problems)
    assert any(p.startswith("spec: method[1].base.name: unknown name 'nosuch'") for p in problems)
    assert any(p.startswith("spec: method[2].base.name: unknown name 'dept'") for p in problems)
    assert len(problems) == 4 and all("\n" not in p for p in problems)


def test_a_base_without_what_the_wrapper_needs_is_one_line_at_validate(reg):
    with pytest.raises(UserError) as exc:
        resolve_methods(spec(reg, {"name": "dept", "base": {"name": "prograd"}}), reg)
    (line,) = exc.value.problems
    assert line.startswith("method 'dept+prograd': base: dept cannot wrap 'prograd'") and "'features'" in line


def test_a_wrapped_methods_own_settling_errors_name_its_path(reg):
    with pytest.raises(UserError) as exc:
        resolve_methods(spec(reg, {"name": "dept", "base": {"name": "coop", "n_ctx": 16, "ctx_init": "a photo"}}),
                        reg)
    (line,) = exc.value.problems
    assert line.startswith("method 'dept+coop': method.base.n_ctx: 16, but ctx_init")


def test_recipes_combine_base_recipe_then_wrapper_recipe_then_spec(reg):
    over, alone, written = resolve_methods(spec(reg, {"name": "dept", "base": {"name": "kgcoop"}}, {"name": "kgcoop"},
                                                {"name": "dept", "base": {"name": "kgcoop", "kg_weight": 5.0}}), reg)
    assert alone.options.kg_weight == 8.0  # kgcoop's own recipe
    assert over.options.base.kg_weight == 2.0 and over.sources["base.kg_weight"] == "recipe"  # dept's, for kgcoop
    assert over.options.base.ctx_init == "a photo of a" and over.sources["base.ctx_init"] == "recipe"  # kgcoop's
    assert written.options.base.kg_weight == 5.0 and written.sources["base.kg_weight"] == "spec"
    # only the wrapper's train settings apply
    assert (over.train.lr, over.train.batch_size, over.train.epochs) == (0.0035, 4, 10)
    assert (alone.train.lr, alone.train.batch_size) == (0.002, 128)
    assert "base" not in over.sources and over.sources["head_weight"] == "default"
    said = over.settled_lines()[0]  # what validate prints: which recipes apply, and how
    assert said.startswith("dept+kgcoop: dept over kgcoop: base options from kgcoop's recipe, then dept's recipe for "
                           "kgcoop (kg_weight=2.0), then the spec") and alone.settled_lines() == []


def test_sections_are_named_after_both_methods(reg):
    from vlprompt_core.spec import method_labels

    assert method_labels(spec(reg, {"name": "dept", "base": {"name": "kgcoop"}}, {"name": "dept", "base": {"name": "coop"}},
                              {"name": "dept", "base": {"name": "coop", "n_ctx": 2}},
                              {"name": "dept", "label": "mine", "base": {"name": "coop"}}, {"name": "coop"})) == [
        "dept+kgcoop", "dept+coop", "dept+coop#2", "mine", "coop"]


def test_keys_and_records_hold_the_wrapped_method(reg):
    methods = resolve_methods(spec(reg, {"name": "dept", "base": {"name": "kgcoop"}},
                                   {"name": "dept", "base": {"name": "coop"}},
                                   {"name": "dept", "base": {"name": "kgcoop", "kg_weight": 3.0}},
                                   {"name": "dept", "base": {"name": "kgcoop", "kg_weight": 2.0}}), reg)
    keys = [m.key for m in methods]
    assert len(set(keys[:3])) == 3 and keys[3] == keys[0]  # the recipe's value written out: the same pairs
    record = methods[0].describe()
    assert record["options"]["base"] == {**record["options"]["base"], "name": "kgcoop", "kg_weight": 2.0}
    assert record["used"]["base"]["n_ctx"] == 4
    assert record["sources"]["base.kg_weight"] == "recipe"


def test_a_checkpoint_holds_both_and_refuses_another_base(reg, tmp_path):
    from vlprompt_core.engine.checkpoints import PairFiles

    kg, coop = resolve_methods(spec(reg, {"name": "dept", "base": {"name": "kgcoop"}},
                                    {"name": "dept", "base": {"name": "coop", "ctx_init": "a photo of a"}}), reg)
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip

    bb = build_open_clip(OpenClipOptions(**{k: v for k, v in BACKBONE.items() if k != "name"}))
    entry = reg.get("method", "dept")
    built = {m.label: entry.make(bb, ClassSet(NAMES), m.used) for m in (kg, coop)}
    files = PairFiles.of(tmp_path, kg, 1)
    files.save(built[kg.label], 0)
    with safe_open(tmp_path / files.checkpoint, "pt") as f:
        assert {"base.ctx", "head.weight", "text_affine.scale"} <= set(f.keys())
    other = PairFiles.of(tmp_path, coop, 1)
    with pytest.raises(UserError, match="trained as options"):
        other.load_into(built[coop.label], tmp_path / files.checkpoint)
    fresh = entry.make(bb, ClassSet(NAMES), kg.used)
    files.load_into(fresh, tmp_path / files.checkpoint)  # the same base loads
    assert torch.equal(fresh.head.weight, built[kg.label].head.weight)


def _docs_wrapper():
    text = (DOCS / "writing-plugins.md").read_text()
    code = re.search(r"### A method that wraps another\n.*?```python\n(.*?)```", text, flags=re.S).group(1)
    module = types.ModuleType("docs_wrapper")
    exec(compile(code, "writing-plugins.md", "exec", dont_inherit=True), module.__dict__)
    return module


def test_the_wrapper_in_the_docs_runs_over_coop_and_is_refused_over_prograd(reg, tiny_backbone):
    docs = build_registry(*make_plugin_manager(extra=(("docs-wrapper", _docs_wrapper()),)))
    entry = docs.get("method", "channel_weights")
    options = entry.effective(entry.options.model_validate({"base": {"name": "coop", "n_ctx": 2}}),
                              BackboneInfo.of(tiny_backbone)).options
    method = entry.make(tiny_backbone, ClassSet(NAMES), options)
    assert type(method.base).__name__ == "CoOp" and method.base.ctx.shape[0] == 2
    method.train()
    images = torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    batch = Batch(image_features=tiny_backbone.encode_image(images).detach(), labels=torch.tensor([0, 1, 2, 1]))
    out = method(batch)
    method.loss(out, batch).backward()
    assert method.base.ctx.grad.abs().sum() > 0 and method.weights.grad.abs().sum() > 0
    with pytest.raises(UserError, match="cannot wrap 'prograd'"):
        entry.effective(entry.options.model_validate({"base": {"name": "prograd"}}), BackboneInfo.of(tiny_backbone))


def test_a_run_records_the_wrapped_method(reg, tmp_path):
    from vlprompt_core.engine import Engine

    data = {"backbone": BACKBONE, "method": {"name": "dept", "base": {"name": "coop", "n_ctx": 2}},
            "dataset": {"name": "embedded_objects"}, "protocol": {"name": "base2novel", "shots": 1},
            "train": {"epochs": 1, "seeds": [1], "device": "cpu", "precision": "fp32"}, "output": str(tmp_path)}
    Engine(validate_spec(data, reg), reg).run()
    record = json.loads((tmp_path / "results.json").read_text())
    described = record["methods"]["dept+coop"]  # named after both methods
    assert described["used"]["base"] == {**described["used"]["base"], "name": "coop", "n_ctx": 2}
    assert record["status"] == "complete" and record["runs"][0]["key"] == described["key"]
    with safe_open(tmp_path / record["runs"][0]["checkpoint"], "pt") as f:
        assert {"base.ctx", "head.weight"} <= set(f.keys())


def test_method_all_leaves_out_the_wrappers(reg):
    names = [m.name for m in validate_spec({"backbone": BACKBONE, "method": "all", "dataset": {"name": "embedded_objects"},
                                            "protocol": {"name": "base2novel", "shots": 2}}, reg).method]
    assert "dept" not in names and {"coop", "kgcoop"} <= set(names)
