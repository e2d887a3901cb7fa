"""Method recipes: rules, precedence (spec > recipe > defaults), what is recorded."""

from __future__ import annotations

import json

import pytest

from toy_methods import TOY_RECIPE, Plugin, RecipeOptions
from vlprompt_core.errors import UserError
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.recipes import Recipe, RecipeCondition, check_recipe
from vlprompt_core.spec import TrainSpec, resolve_methods, validate_spec


@pytest.fixture(scope="module")
def reg(world):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
        yield build_registry(*make_plugin_manager(extra=(("toys", Plugin()),)))


def spec(world, reg, method, protocol=None, dataset="toy", train=None):
    return validate_spec({
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method,
        "dataset": {"name": dataset, "root": str(world["data"])},
        "protocol": protocol or {"name": "base2novel", "shots": 4},
        "train": train or {},
    }, reg)


def test_condition_matching():
    c = RecipeCondition(protocol="few_shot", shots=[1, 2])
    assert c.matches({"protocol": "few_shot", "shots": 2, "dataset": "x"})
    assert not c.matches({"protocol": "few_shot", "shots": 4})
    assert not c.matches({"protocol": "base2novel", "shots": 2})
    assert RecipeCondition().matches({"protocol": "anything"})


def test_rules_apply_in_order_later_wins():
    r = Recipe(train={"epochs": 1}, rules=[{"when": {"shots": 2}, "train": {"epochs": 2}},
                                            {"when": {"dataset": "d"}, "train": {"epochs": 3}}])
    assert r.for_context({"shots": 2, "dataset": "d"})[0] == {"epochs": 3}
    assert r.for_context({"shots": 2, "dataset": "e"})[0] == {"epochs": 2}
    assert r.for_context({"shots": 1, "dataset": "e"})[0] == {"epochs": 1}


def test_recipe_fills_what_the_spec_leaves_out(world, reg):
    (m,) = resolve_methods(spec(world, reg, {"name": "toy_recipe"}), reg)
    assert (m.train.lr, m.train.epochs, m.train.batch_size) == (0.1, 3, 2)
    assert m.train.momentum == TrainSpec().momentum  # neither spec nor recipe: the default
    assert (m.options.width, m.options.mode) == (4, "a")
    assert m.sources["train.lr"] == "recipe" and m.sources["train.momentum"] == "default"
    assert m.sources["width"] == "recipe" and m.sources["mode"] == "default"


def test_rules_follow_protocol_shots_and_dataset(world, reg):
    few = {"name": "few_shot", "shots": 2}
    (m,) = resolve_methods(spec(world, reg, {"name": "toy_recipe"}, protocol=few), reg)
    assert m.train.epochs == 5 and m.options.mode == "b"
    (m,) = resolve_methods(spec(world, reg, {"name": "toy_recipe"}, protocol=few, dataset="toy_shift"), reg)
    assert m.train.epochs == 7 and m.options.mode == "b"  # the later rule wins for epochs


def test_the_spec_wins_over_the_recipe(world, reg):
    s = spec(world, reg, [{"name": "toy_recipe", "width": 2, "train": {"epochs": 9}},
                          {"name": "toy_recipe", "label": "b"}], train={"lr": 0.5, "seeds": [1]})
    own, other = resolve_methods(s, reg)
    assert (own.train.epochs, own.train.lr, own.options.width) == (9, 0.5, 2)
    assert (other.train.epochs, other.train.lr, other.options.width) == (3, 0.5, 4)
    assert own.sources["train.epochs"] == own.sources["train.lr"] == own.sources["width"] == "spec"
    assert other.sources["train.lr"] == "spec" and other.sources["train.epochs"] == "recipe"


def test_method_all_trains_each_method_with_its_own_recipe(world, reg):
    resolved = {m.name: m for m in resolve_methods(spec(world, reg, "all"), reg)}
    assert resolved["toy_recipe"].train.lr == 0.1
    assert resolved["coop"].train.epochs == 100 and resolved["coop"].train.lr == 0.002  # CoOp at 4 shots
    assert resolved["toy_hooks"].train == TrainSpec()  # no recipe: the defaults


def test_coop_recipe_epochs_by_shots(world, reg):
    epochs = {}
    for shots in (1, 2, 4, 8, 16):
        (m,) = resolve_methods(spec(world, reg, {"name": "coop"}, protocol={"name": "few_shot", "shots": shots}), reg)
        epochs[shots] = m.train.epochs
    assert epochs == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}


def test_recipe_option_that_conflicts_with_the_spec_names_the_recipe(world, reg, monkeypatch):
    monkeypatch.setattr(TOY_RECIPE, "options", {"width": "not a number"})
    with pytest.raises(UserError) as exc:
        resolve_methods(spec(world, reg, {"name": "toy_recipe"}), reg)
    (line,) = exc.value.problems
    assert "method 'toy_recipe'" in line and "recipe's width='not a number'" in line


def test_a_recipe_naming_unknown_fields_is_a_plugin_failure():
    with pytest.raises(UserError) as exc:
        check_recipe(Recipe(train={"epochz": 1}, rules=[{"when": {}, "options": {"nope": 1}}]), RecipeOptions, "m")
    assert exc.value.problems == [
        "recipe of method 'm': train has unknown field(s) ['epochz']",
        "recipe of method 'm': rules[0].options has unknown option(s) ['nope']",
    ]
    from vlprompt_core import hookimpl
    from vlprompt_core.api import MethodEntry
    from toy_methods import ToyRecipeMethod

    class Bad:
        @hookimpl
        def vlprompt_methods(self):
            return [MethodEntry("bad_recipe", RecipeOptions, ToyRecipeMethod, "", Recipe(train={"epochz": 1}))]

    reg = build_registry(*make_plugin_manager(extra=(("bad", Bad()),)))
    assert "bad_recipe" not in reg.names("method")
    (failure,) = [f for f in reg.failures if f.entry_point == "bad"]
    assert "epochz" in failure.error


def test_resolved_settings_are_stored_and_shown(world, reg, tmp_path):
    from vlprompt_core.engine import Engine

    s = spec(world, reg, {"name": "toy_recipe", "train": {"epochs": 1}}, protocol={"name": "few_shot", "shots": 1},
             train={"seeds": [1], "device": "cpu"})
    s.output = tmp_path / "out"
    record = Engine(s, reg).run()
    stored = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["toy_recipe"]
    assert stored == record["methods"]["toy_recipe"]
    assert stored["train"]["epochs"] == 1 and stored["train"]["lr"] == 0.1 and stored["options"]["mode"] == "b"
    assert stored["sources"]["train.epochs"] == "spec" and stored["sources"]["mode"] == "recipe"
    assert record["runs"][0]["key"] == stored["key"]
    assert [e["lr"] for e in record["runs"][0]["epochs"]] == [1e-5]  # the warm-up epoch
    from rich.console import Console
    from vlprompt_core.results import settings_table

    console = Console(width=120, record=True)
    console.print(settings_table(resolve_methods(s, reg)))
    text = console.export_text()
    assert "toy_recipe" in text and "epochs 1," in text and "lr 0.1*" in text and "mode='b'*" in text


#: Train settings a method that does not train never reads (each changes a trained method's key).
TRAINING_ONLY = ({"epochs": 30, "lr": 0.5}, {"batch_size": 8, "optimizer": "adamw", "weight_decay": 0.1},
                 {"momentum": 0.5, "schedule": "constant", "warmup_epochs": 0, "warmup_lr": 0.001},
                 {"crop_scale": [0.8, 1.0], "augment_views": 4})


class Untrained:
    """A third-party method that declares it does not train."""

    @staticmethod
    def plugin():
        from toy_methods import ToyRecipeMethod
        from vlprompt_core import hookimpl
        from vlprompt_core.api import MethodEntry

        class Plugin:
            @hookimpl
            def vlprompt_methods(self):
                return [MethodEntry("frozen_toy", RecipeOptions, ToyRecipeMethod, "scores without training",
                                    trains=False)]
        return Plugin()


def test_a_method_that_does_not_train_is_keyed_without_the_train_settings_it_never_reads(world, reg):
    def key(method: dict, registry=reg, **train) -> str:
        (m,) = resolve_methods(spec(world, registry, method, train={"seeds": [1], **train}), registry)
        return m.key

    def check(method: dict, registry) -> None:
        plain = key(method, registry)
        for train in TRAINING_ONLY:
            assert key(method, registry, **train) == plain, train
        # what can still change its scores keeps it apart
        assert key(method, registry, precision="fp32") != key(method, registry, precision="bf16")
        assert key(method, registry, seeds=[1, 2, 3]) == plain  # as for every method

    check({"name": "zeroshot"}, reg)
    assert key({"name": "zeroshot", "templates": "ensemble"}) != key({"name": "zeroshot"})
    for train in TRAINING_ONLY:  # a method that trains: each of them counts
        assert key({"name": "coop"}, **train) != key({"name": "coop"}), train
    # the entry says so, not the core: any method may
    assert reg.get("method", "zeroshot").trains is False and reg.get("method", "coop").trains is True
    frozen = build_registry(*make_plugin_manager(extra=(("toys", Plugin()), ("frozen", Untrained.plugin()))))
    check({"name": "frozen_toy"}, frozen)
    # of the keyed train settings, an untrained method keeps only what scoring reads
    # (a new train field must be placed: it is in every key until named training-only)
    from vlprompt_core import recipes

    assert set(TrainSpec.model_fields) - recipes._NOT_IN_KEY - recipes._TRAINING_ONLY == {"precision"}
