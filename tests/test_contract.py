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


LOGGERS = '''
import random
from pathlib import Path

import numpy as np
import torch

from vlprompt_core import hookimpl
from vlprompt_core.api import LoggerEntry, Options
from vlprompt_core.testing import LoggerContract


class Opts(Options):
    folder: str = "log"


def _mine(spec, name):
    return any(section["name"] == name for section in spec["loggers"])


class Loggers:
    """Loggers, each writing into a folder of its own: one sound; one that meddles (it
    reseeds the random generators and changes what it is given: the engine hands it
    copies and restores the generators, so it passes); one whose epoch hook raises; one
    that makes float64 torch's default dtype for the run (the method's context is then
    made in float64); one that removes results.md when the run ends."""

    enabled: set = set()

    @hookimpl
    def vlprompt_loggers(self):
        return [LoggerEntry(n, Opts, "") for n in ("sound", "meddles", "raises", "dtype", "removes")]

    @hookimpl
    def vlprompt_run_start(self, spec, output_dir):
        self.enabled = {s["name"] for s in spec["loggers"]}
        for name in self.enabled:
            (Path(output_dir) / name).mkdir(exist_ok=True)
            (Path(output_dir) / name / "log.txt").write_text("start\\n")
        if "meddles" in self.enabled:
            spec["train"]["epochs"] = 99
        if "dtype" in self.enabled:
            torch.set_default_dtype(torch.float64)

    @hookimpl
    def vlprompt_epoch_end(self, method, seed, epoch, metrics, output_dir):
        if "meddles" in self.enabled:
            torch.manual_seed(epoch)
            np.random.seed(epoch)
            random.seed(epoch)
            metrics["loss"] = 0.0
        if "raises" in self.enabled:
            raise RuntimeError("no disk for my curves")

    @hookimpl
    def vlprompt_evaluation_done(self, method, seed, results, output_dir):
        if "meddles" in self.enabled:
            results["accuracy"] = {name: 100.0 for name in results["accuracy"]}

    @hookimpl
    def vlprompt_run_end(self, results, output_dir):
        torch.set_default_dtype(torch.float32)
        if "removes" in self.enabled:
            (Path(output_dir) / "results.md").unlink()


class TestSound(LoggerContract):
    logger = "sound"
    plugin = Loggers()


class TestRaises(LoggerContract):
    logger = "raises"
    plugin = Loggers()


class TestMeddles(LoggerContract):
    logger = "meddles"
    plugin = Loggers()


class TestDtype(LoggerContract):
    logger = "dtype"
    plugin = Loggers()


class TestRemoves(LoggerContract):
    logger = "removes"
    plugin = Loggers()
'''


@pytest.mark.slow  # the logger battery's runs, for five toy loggers
def test_broken_loggers_fail_the_logger_contract(pytester):
    pytester.makepyfile(test_loggers=textwrap.dedent(LOGGERS))
    result = pytester.runpytest("-q", "-p", "no:cacheprovider", "-W", "ignore")
    failed: dict[str, set[str]] = {}
    for report in result.reprec.getreports("pytest_runtest_logreport"):
        cls, test = report.nodeid.split("::")[1:3]
        failed.setdefault(cls, set())
        if report.outcome == "failed":
            failed[cls].add(test)
    assert failed == {
        "TestSound": set(),
        "TestMeddles": set(),
        "TestRaises": {"test_none_of_its_hooks_raised"},
        # its pair fails (float64 context, float32 tower), so its checkpoint is missing too
        "TestDtype": {"test_enabling_it_changes_no_result", "test_it_writes_beside_the_run_and_leaves_the_runs_files_alone"},
        "TestRemoves": {"test_it_writes_beside_the_run_and_leaves_the_runs_files_alone"},
    }


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
