"""The logger contract: one test battery every logger plug-in runs.

Subclass :class:`LoggerContract` in your plug-in's tests::

    from vlprompt_core.testing import LoggerContract

    class TestMyLogger(LoggerContract):
        logger = "mylogger"                  # the registered name
        options = {"project": "offline"}     # its section in ``loggers:``, besides the name

The battery runs the same seeded run on the tiny world (a tiny random open_clip model,
a generated 6-class dataset, a method of its own that learns two context vectors: it
needs no method plug-in) once with the logger enabled and once without, and checks that:

* the options model rejects unknown keys, and a spec enabling the logger validates;
* enabling it changes no result: the same accuracies, the same loss in every epoch,
  bit-identical checkpoints, and the same results keys (a finished run is reused when the
  logger is switched on or off);
* none of its hooks raised in the whole run (the engine reports a failing hook and goes
  on; here that is a failure);
* the files the run writes are those of the run without it, plus only what the logger
  wrote itself.

Loggers not installed as a distribution can set ``plugin`` to an object holding their
hook implementations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import ValidationError

from .. import hookimpl
from ..api import MethodEntry, MethodOutput, Options, PromptMethod
from .worlds import registered_world

#: The files of a run that a logger must leave as the run without it has them (their
#: content compared where it holds results).
RUN_FILES = ("results.json", "results.md")


class _ContextOptions(Options):
    n_ctx: int = 2


class _Context(PromptMethod):
    """Two learned context vectors before the class name (CoOp's mechanics, in brief)."""

    def __init__(self, backbone, classes, options: _ContextOptions):
        from ..prompting import PromptTemplate, init_context

        super().__init__(backbone, classes, options)
        self.ctx = torch.nn.Parameter(init_context(backbone, options.n_ctx))
        self.template = PromptTemplate.with_context(options.n_ctx)
        self.set_classes(classes)

    def set_classes(self, classes):
        from ..prompting import PromptTable

        self.prompts = PromptTable(self.backbone, list(classes.names), self.template)

    def forward(self, batch):
        from vlprompt_kernels import cosine_logits

        text = self.prompts.encode(self.backbone, self.ctx)
        return MethodOutput(cosine_logits(batch.image_features.float(), text.float(), self.backbone.logit_scale))


class _ContractMethod:
    @hookimpl
    def vlprompt_methods(self):
        return [MethodEntry("logger_contract_context", _ContextOptions, _Context,
                            "two learned context vectors (the logger contract's own method)")]


class LoggerContract:
    """The battery; see the module docstring. Class attributes configure it."""

    #: The registered logger name.
    logger: ClassVar[str]
    #: Its options in the spec's ``loggers:`` section (the name is added).
    options: ClassVar[dict[str, Any]] = {}
    #: An object with hook implementations to register in-process (optional).
    plugin: ClassVar[Any] = None

    @pytest.fixture(scope="class")
    @classmethod
    def logger_world(cls, tmp_path_factory):
        with registered_world(tmp_path_factory.mktemp("logger-contract")) as world:
            yield world

    @pytest.fixture(scope="class")
    @classmethod
    def logger_registry(cls, logger_world):
        from ..plugins import build_registry, make_plugin_manager

        extra = (("logger-contract-method", _ContractMethod()),)
        if cls.plugin is not None:
            extra += (("contract-plugin", cls.plugin),)
        return build_registry(*make_plugin_manager(extra=extra))

    @classmethod
    def spec_data(cls, world, output: Path, logged: bool) -> dict[str, Any]:
        return {
            "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
            "method": [{"name": "logger_contract_context"}],
            "dataset": {"name": "toy", "root": str(world["data"])},
            "protocol": {"name": "few_shot", "shots": 2},
            "train": {"epochs": 2, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32"},
            "loggers": [{"name": cls.logger, **cls.options}] if logged else [],
            "output": str(output),
        }

    @pytest.fixture(scope="class")
    @classmethod
    def runs(cls, logger_world, logger_registry, tmp_path_factory):
        """``{"logged": (record, output, log lines), "plain": ...}``: the same run with and without the logger."""
        from ..engine import Engine
        from ..spec import check_spec, validate_spec

        out = {}
        for kind in ("plain", "logged"):
            output = tmp_path_factory.mktemp(kind)
            spec = validate_spec(cls.spec_data(logger_world, output, kind == "logged"), logger_registry)
            check_spec(spec, logger_registry)
            lines: list[str] = []
            out[kind] = (Engine(spec, logger_registry, log=lines.append).run(), output, lines)
        return out

    def test_options_reject_unknown_keys(self, logger_registry):
        entry = logger_registry.get("logger", self.logger)
        entry.options.model_validate(self.options)
        with pytest.raises(ValidationError):
            entry.options.model_validate({**self.options, "surely_not_an_option": 1})

    def test_a_spec_enabling_it_validates(self, logger_world, logger_registry, tmp_path):
        from ..spec import validate_spec

        spec = validate_spec(self.spec_data(logger_world, tmp_path, logged=True), logger_registry)
        assert [section.name for section in spec.loggers] == [self.logger]

    def test_enabling_it_changes_no_result(self, runs, logger_world, logger_registry, tmp_path):
        from safetensors.torch import load_file

        from ..spec import resolve_methods, spec_hash, validate_spec

        (logged, logged_out, _), (plain, plain_out, _) = runs["logged"], runs["plain"]
        assert logged["status"] == plain["status"] == "complete"
        (a,), (b,) = logged["runs"], plain["runs"]
        assert a["accuracy"] == b["accuracy"]
        assert [e["loss"] for e in a["epochs"]] == [e["loss"] for e in b["epochs"]]
        assert a["key"] == b["key"]
        ta, tb = load_file(str(logged_out / a["checkpoint"])), load_file(str(plain_out / b["checkpoint"]))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        specs = [validate_spec(self.spec_data(logger_world, tmp_path, logged), logger_registry) for logged in (1, 0)]
        assert spec_hash(specs[0]) == spec_hash(specs[1])
        assert [m.key for m in resolve_methods(specs[0], logger_registry)] == [
            m.key for m in resolve_methods(specs[1], logger_registry)]

    def test_none_of_its_hooks_raised(self, runs):
        _, _, lines = runs["logged"]
        failed = [line for line in lines if line.startswith("warning: plug-in") and " failed in " in line]
        assert failed == [], failed

    def test_it_writes_beside_the_run_and_leaves_the_runs_files_alone(self, runs):
        (_, logged_out, _), (_, plain_out, _) = runs["logged"], runs["plain"]

        def files(folder: Path) -> set[str]:
            return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}

        missing = files(plain_out) - files(logged_out)
        assert missing == set(), f"files a run writes are missing with the logger: {sorted(missing)}"
        for name in RUN_FILES:
            assert (logged_out / name).is_file(), name
