"""The contract suite itself: zero-shot passes it, and deliberately broken toy
methods fail exactly the tests that describe what they break."""

from __future__ import annotations

import textwrap

import pytest

from vlprompt_core.testing import Case, MethodContract


class TestZeroShotContract(MethodContract):
    method = "zeroshot"
    cases = [Case({}), Case({"templates": "ensemble"}), Case({"templates": ["{} texture.", "a photo of a {}."]})]


BROKEN = '''
import torch
from torch import nn
from vlprompt_core import hookimpl
from vlprompt_core.api import MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.prompting import PromptTable, PromptTemplate, init_context
from vlprompt_core.testing import MethodContract
from vlprompt_kernels import cosine_logits


class Opts(Options):
    n_ctx: int = 2


class Sound(PromptMethod):
    """A correct CoOp-like method; the broken ones below change one thing each."""

    def __init__(self, backbone, classes, options):
        super().__init__(backbone, classes, options)
        self.ctx = nn.Parameter(init_context(backbone, options.n_ctx))
        self.template = PromptTemplate.with_context(options.n_ctx)
        self.set_classes(classes)

    def set_classes(self, classes):
        self.prompts = PromptTable(self.backbone, classes.names, self.template)

    def forward(self, batch):
        text = self.prompts.encode(self.backbone, self.ctx)
        return MethodOutput(cosine_logits(batch.image_features.float(), text, self.backbone.logit_scale))


class TouchesBackbone(Sound):
    """Nudges a frozen backbone weight in every training forward."""

    def forward(self, batch):
        if self.training:
            with torch.no_grad():
                self.backbone.text.ln_final.weight.mul_(1.001)
        return super().forward(batch)


class HoldsBackbone(Sound):
    """Keeps the backbone in a submodule of its own, back in the module tree."""

    def __init__(self, backbone, classes, options):
        super().__init__(backbone, classes, options)
        self.towers = nn.ModuleDict({"frozen": backbone})


class IgnoresNewClasses(Sound):
    """set_classes keeps the classifier it was built with."""

    def set_classes(self, classes):
        if not hasattr(self, "prompts"):
            super().set_classes(classes)


class Plugin:
    @hookimpl
    def vlprompt_methods(self):
        return [MethodEntry(n, Opts, cls, "") for n, cls in
                [("sound", Sound), ("touches_backbone", TouchesBackbone), ("ignores_classes", IgnoresNewClasses),
                 ("holds_backbone", HoldsBackbone)]]


class TestSound(MethodContract):
    method = "sound"
    plugin = Plugin()


class TestTouchesBackbone(MethodContract):
    method = "touches_backbone"
    plugin = Plugin()


class TestIgnoresNewClasses(MethodContract):
    method = "ignores_classes"
    plugin = Plugin()


class TestHoldsBackbone(MethodContract):
    method = "holds_backbone"
    plugin = Plugin()
'''


@pytest.mark.slow  # the whole battery, engine runs included, for three toy methods
def test_broken_methods_fail_the_contract(pytester):
    pytester.makepyfile(test_broken=textwrap.dedent(BROKEN))
    result = pytester.runpytest("-q", "-p", "no:cacheprovider", "-W", "ignore")
    outcomes: dict[str, dict[str, set[str]]] = {}  # class -> test -> outcomes over its parameters
    for report in result.reprec.getreports("pytest_runtest_logreport"):
        if report.when == "call" or report.outcome != "passed":
            cls, test = report.nodeid.split("::")[1:3]
            outcomes.setdefault(cls, {}).setdefault(test.split("[")[0], set()).add(report.outcome)
    fitting = "test_fitting_is_deterministic_and_leaves_the_backbone_alone"  # Sound fits nothing: skipped
    assert outcomes["TestSound"].pop(fitting) == {"skipped"}
    assert all(o == {"passed"} for o in outcomes["TestSound"].values()), outcomes["TestSound"]
    assert len(outcomes["TestSound"]) == 13  # every other test of the battery ran
    failed = lambda cls: {t for t, o in outcomes[cls].items() if "failed" in o}  # noqa: E731
    assert failed("TestTouchesBackbone") == {
        "test_a_step_changes_trainable_parameters_and_nothing_else",
        "test_training_leaves_the_backbone_bit_identical",
    }
    assert failed("TestIgnoresNewClasses") == {
        "test_set_classes_to_another_class_count",
        "test_permuting_class_names_permutes_scores",
        "test_runs_under_every_protocol",  # base2novel scores novel classes
    }
    assert "test_the_backbone_is_out_of_the_methods_reach" in failed("TestHoldsBackbone")


# ------------------------------------------------- the backbone is not the method's


class _Toy:
    """A method with one parameter, built on the tiny backbone (made lazily)."""

    @staticmethod
    def build(backbone):
        import torch
        from torch import nn

        from vlprompt_core.api import ClassSet, Options, PromptMethod

        class Toy(PromptMethod):
            def __init__(self, backbone, classes, options):
                super().__init__(backbone, classes, options)
                self.ctx = nn.Parameter(torch.zeros(2, backbone.text_width))
                self.head = nn.Linear(2, 2)

        return Toy(backbone, ClassSet(["a", "b"]), Options())


def test_the_backbone_is_out_of_the_methods_module_tree(tiny_backbone):
    import torch

    method = _Toy.build(tiny_backbone)
    assert method.backbone is tiny_backbone
    frozen = {id(p) for p in tiny_backbone.parameters()}
    assert [n for n, p in method.named_parameters()] == ["ctx", "head.weight", "head.bias"]
    assert not frozen & {id(p) for p in method.parameters()}
    assert set(method.state_dict()) == {"ctx", "head.weight", "head.bias"}
    visited = []
    method.apply(visited.append)
    assert not any(m is tiny_backbone for m in visited) and len(visited) == 2  # head, the method
    method.half()  # e.g. a plug-in's own test; the shared backbone stays as it was
    assert method.ctx.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in tiny_backbone.parameters())
    method.backbone = tiny_backbone  # assigned again by a subclass: still not a submodule
    assert "backbone" not in dict(method.named_children())
