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


# ------------------------------------- rules on the backbone; the settings a method uses


class Deep:
    """A third-party deep-prompt method: ``depth`` prompts, at most as many as the
    shallower tower has blocks (it says so), and a recipe with rules on the backbone."""

    @staticmethod
    def recipe() -> Recipe:
        return Recipe(options={"depth": 9}, rules=[
            {"when": {"vision_depth": [2, 3]}, "options": {"scale": 0.5}},
            {"when": {"family": "ViT-B/16", "text_width": 512}, "options": {"scale": 2.0}},
            {"when": {"protocol": "cross_dataset", "vision_width": 768}, "train": {"epochs": 2}},
        ])

    @staticmethod
    def plugin():
        import torch
        from torch import nn

        from vlprompt_core import hookimpl
        from vlprompt_core.api import EffectiveOptions, MethodEntry, MethodOutput, Options, PromptMethod

        class DeepOptions(Options):
            depth: int = 1
            scale: float = 1.0

        class DeepToy(PromptMethod):
            @classmethod
            def effective_options(cls, options, backbone):
                towers = [d for d in (backbone.text_depth, backbone.vision_depth) if d is not None]
                if not towers or options.depth <= min(towers):
                    return EffectiveOptions(options)
                used = min(towers)
                return EffectiveOptions(options.model_copy(update={"depth": used}),
                                        (f"depth {options.depth} -> {used}: the towers have {used} blocks",))

            def __init__(self, backbone, classes, options):
                super().__init__(backbone, classes, options)
                self.deep = nn.Parameter(torch.zeros(options.depth, backbone.text_width))
                self.set_classes(classes)

            def set_classes(self, classes):
                self.n = len(classes)

            def forward(self, batch):
                logits = batch.image_features.float()[:, : self.n] * self.options.scale + self.deep.sum()
                return MethodOutput(logits)

        class Plugin:
            @hookimpl
            def vlprompt_methods(self):
                return [MethodEntry("deep_toy", DeepOptions, DeepToy, "clamps its depth", Deep.recipe())]

        return Plugin()


@pytest.fixture(scope="module")
def deep_reg(world):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
        yield build_registry(*make_plugin_manager(extra=(("toys", Plugin()), ("deep", Deep.plugin()))))


def test_rules_match_the_backbones_family_depth_and_width():
    from vlprompt_core.api import BackboneInfo

    vit_b16 = {"protocol": "few_shot", **BackboneInfo("ViT-B-16", 12, 512, 12, 768).matched()}
    recipe = Deep.recipe()
    assert recipe.for_context(vit_b16)[1] == {"depth": 9, "scale": 2.0}  # ViT-B/16 is ViT-B-16
    assert recipe.for_context({**vit_b16, "protocol": "cross_dataset"})[0] == {"epochs": 2}
    tiny = BackboneInfo("tiny_test", 2, 32, 2, 32).matched()
    assert recipe.for_context(tiny) == ({}, {"depth": 9, "scale": 0.5})
    assert RecipeCondition(family=["vit-b-16", "RN50"]).matches({"family": "ViT-B/16"})
    assert not RecipeCondition(text_depth=12).matches({"text_depth": 2})


def test_rules_on_the_backbone_resolve_from_its_config_without_loading_it(world, deep_reg, monkeypatch):
    import open_clip

    def no_model(*args, **kwargs):
        raise AssertionError("the model was made to resolve a recipe")

    monkeypatch.setattr(open_clip, "create_model", no_model)
    (m,) = resolve_methods(spec(world, deep_reg, {"name": "deep_toy"}), deep_reg)
    assert m.options.scale == 0.5 and m.sources["scale"] == "recipe"  # the tiny config's 2 image blocks


def test_a_rule_on_what_the_backbone_cannot_tell_is_one_line(world, deep_reg):
    import dataclasses

    from vlprompt_core.plugins import Registry

    entries = {kind: dict(v) for kind, v in deep_reg.entries.items()}
    entries["backbone"]["open_clip"] = dataclasses.replace(entries["backbone"]["open_clip"], info=None)
    blind = Registry(entries=entries, sources=deep_reg.sources, failures=deep_reg.failures, pm=deep_reg.pm)
    with pytest.raises(UserError) as exc:
        resolve_methods(spec(world, blind, {"name": "deep_toy"}), blind)
    assert exc.value.problems == ["method 'deep_toy': its recipe has rules on the backbone's family, text_width, "
                                  "vision_depth, which backbone 'open_clip' cannot tell before loading its weights"]
    # a rule that cannot apply anyway (another protocol) is no problem; nor is a method without such rules
    (m,) = resolve_methods(spec(world, blind, {"name": "toy_recipe"}), blind)
    assert m.used == m.options and m.notes == ()


def test_a_method_states_the_settings_it_uses_and_is_built_with_them(world, deep_reg, tmp_path):
    from vlprompt_core.engine import Engine

    s = spec(world, deep_reg, {"name": "deep_toy", "train": {"epochs": 1}},
             protocol={"name": "few_shot", "shots": 1}, train={"seeds": [1], "device": "cpu"})
    s.output = tmp_path / "out"
    (m,) = resolve_methods(s, deep_reg)  # validate: told from the config, before anything loads
    assert (m.options.depth, m.used.depth, m.notes) == (9, 2, ("depth 9 -> 2: the towers have 2 blocks",))
    assert m.changed() == {"depth": (9, 2)}
    record = Engine(s, deep_reg).run()
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    described = stored["methods"]["deep_toy"]
    assert described["options"]["depth"] == 9 and described["used"] == {"depth": 2, "scale": 0.5}
    assert described["notes"] == ["depth 9 -> 2: the towers have 2 blocks"]
    assert stored["backbone"]["family"] == "tiny_test" and stored["backbone"]["vision_depth"] == 2
    assert record["runs"][0]["cost"]["trainable_parameters"] == 2 * 32  # built with depth 2, not 9
    # the key is made of what the spec and recipe ask for (the backbone section is in it too)
    assert record["runs"][0]["key"] == described["key"]
    from vlprompt_core.recipes import method_key

    assert m.key == method_key(s, m)


def test_a_method_entry_that_returns_something_else_breaks_the_contract(world, deep_reg):
    import dataclasses

    from vlprompt_core.api import BackboneInfo, ContractError

    entry = deep_reg.get("method", "deep_toy")

    class Sloppy(entry.build):
        @classmethod
        def effective_options(cls, options, backbone):
            return options  # not EffectiveOptions

    with pytest.raises(ContractError, match="EffectiveOptions"):
        dataclasses.replace(entry, build=Sloppy).effective(entry.options(), BackboneInfo())


def test_a_plugin_whose_effective_options_raises_is_one_line_naming_it(world, deep_reg, monkeypatch):
    entry = deep_reg.get("method", "deep_toy")

    def broken(options, backbone):
        raise KeyError("depth")

    monkeypatch.setattr(entry.build, "effective_options", broken)
    with pytest.raises(UserError) as exc:
        resolve_methods(spec(world, deep_reg, {"name": "deep_toy"}), deep_reg)
    assert exc.value.problems == ["method 'deep_toy': deep_toy's effective_options raised KeyError: 'depth' "
                                  "(a fault in its plug-in: report it to its authors)"]


@pytest.mark.parametrize("model", ["config", "openai"])
def test_what_the_backbone_is_told_without_weights_is_what_the_built_one_says(world, tmp_path, model):
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from vlprompt_core.api import BackboneInfo
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip, open_clip_info

    if model == "config":
        options = OpenClipOptions(model=str(world["config"]), pretrained=None)
    else:  # an OpenAI-format file: the sizes come from its tensors' shapes
        torch.manual_seed(0)
        clip = CLIP(32, CLIPVisionCfg(layers=3, width=64, patch_size=8, image_size=16),
                    CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2), quick_gelu=True)
        torch.save(clip.state_dict(), tmp_path / "ViT-T-8.pt")
        options = OpenClipOptions(model="ViT-B-32", pretrained=str(tmp_path / "ViT-T-8.pt"), format="openai")
    told = open_clip_info(options)
    built = BackboneInfo.of(build_open_clip(options), told)
    assert told.describe() == built.describe()
    assert told.family == ("tiny_test" if model == "config" else "ViT-T-8")
    assert told.word_tokens("a photo of a") == built.word_tokens("a photo of a") == 4
    if model == "openai":
        assert (told.vision_depth, told.text_depth, told.context_length) == (3, 2, 77)
