"""The method contract: one test battery every method plug-in runs.

Subclass :class:`MethodContract` in your plug-in's tests; pytest collects every
test below for each of your cases::

    from vlprompt_core.testing import Case, MethodContract

    class TestMyMethod(MethodContract):
        method = "mymethod"                       # the registered name
        cases = [{"n_ctx": 4}, Case({"csc": True}, fixed_classes=True)]

Each case is a dict of options (or a :class:`Case`). The battery builds the
method on a tiny random open_clip backbone (16 px images, width 32, 2 blocks per
tower) and a generated 6-class dataset, as the engine builds it (with the options
its ``effective_options`` says it uses there), and checks that:

* the options model rejects unknown keys;
* the forward gives finite scores ``[B, C]`` for the current classes;
* the frozen backbone is out of the method's reach: none of its tensors is among
  the method's parameters, buffers or ``state_dict``, ``apply`` never visits its
  modules and ``half()`` leaves it as it was;
* gradients reach every trainable parameter, and only those (no backbone weight
  trains, none gets a gradient);
* an optimiser step changes trainable parameters and nothing else: the backbone
  and every other tensor of the method stay bit-identical;
* ``set_classes`` to another class count gives scores for the new classes, and
  permuting the class names permutes the scores (or, for a case marked
  ``fixed_classes``, fails with a one-line user error, and the method's
  ``fixed_classes(options)`` says so before anything is built);
* a checkpoint round trip (the engine's own save and load) gives identical scores,
  fitted tensors included (loaded into a method that was never fitted);
* for a method with ``before_training`` / ``after_training``: fitting (on
  :func:`~vlprompt_core.testing.synthetic_frozen_data`) is deterministic and leaves the
  backbone bit-identical; every other test sees the method fitted, as the engine
  scores it;
* training through the engine leaves the backbone bit-identical and in eval mode,
  and a seeded run is deterministic (identical checkpoints and accuracies);
* the method runs under few-shot, base-to-novel and cross-dataset (domain
  generalisation plans as cross-dataset does); the transfer targets share the source's
  class names, so a ``fixed_classes`` case is refused only under base-to-novel
  (:mod:`~vlprompt_core.testing.contract_runs`).

Stochastic methods: the battery calls ``torch.manual_seed`` before each forward it
compares, so methods that draw from torch's default generator compare equal.
Methods not installed as a distribution (e.g. in the plug-in's own repository
before ``pip install``) can set ``plugin`` to an object holding their hook
implementations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch

from ..api import BackboneInfo, Batch, ClassSet, PromptMethod
from ..errors import UserError
from .contract_runs import EngineRuns
from .frozen import synthetic_frozen_data
from .worlds import COLOURS, registered_world


@dataclass
class Case:
    """Options for one run of the battery; ``fixed_classes`` when the method, with
    these options, cannot score classes other than those it was built for."""

    options: dict[str, Any] = field(default_factory=dict)
    fixed_classes: bool = False
    id: str | None = None

    def name(self) -> str:
        return self.id or (",".join(f"{k}={v}" for k, v in self.options.items()) or "defaults")


NAMES = ["red", "green", "blue", "yellow"]
OTHER_NAMES = ["purple", "orange", "red", "green", "apple pie", "blue"]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _scores(method: PromptMethod, batch: Batch, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return method.predict(method(batch)).float()


def _fits(method: PromptMethod) -> bool:
    """Whether ``method`` overrides a fitting hook (``before_training``, ``after_training``)."""
    return any(getattr(type(method), hook) is not getattr(PromptMethod, hook)
               for hook in ("before_training", "after_training"))


class MethodContract(EngineRuns):
    """The battery; see the module docstring. Class attributes configure it."""

    #: The registered method name.
    method: ClassVar[str]
    #: Option sets to run the battery with (dicts or :class:`Case`).
    cases: ClassVar[list] = [{}]
    #: An object with hook implementations to register in-process (optional).
    plugin: ClassVar[Any] = None
    #: Extra ``train:`` settings for the engine runs (e.g. a larger batch).
    train: ClassVar[dict[str, Any]] = {}
    #: Tolerance for "identical" scores where recomputation is not bitwise.
    atol: ClassVar[float] = 1e-5

    # --------------------------------------------------------------- setup
    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            cases = [c if isinstance(c, Case) else Case(dict(c)) for c in self.cases]
            metafunc.parametrize("case", cases, ids=[c.name() for c in cases], scope="class")

    # Class-scoped fixtures are classmethods (``@pytest.fixture`` above ``@classmethod``):
    # they run once per test class, so they read the class's attributes, never an
    # instance's (pytest 9.1 deprecates class-scoped fixtures as instance methods).
    @pytest.fixture(scope="class")
    @classmethod
    def contract_world(cls, tmp_path_factory):
        with registered_world(tmp_path_factory.mktemp("contract")) as world:
            yield world

    @pytest.fixture(scope="class")
    @classmethod
    def contract_registry(cls, contract_world):
        from ..plugins import build_registry, make_plugin_manager

        extra = (("contract-plugin", cls.plugin),) if cls.plugin is not None else ()
        return build_registry(*make_plugin_manager(extra=extra))

    @pytest.fixture(scope="class")
    @classmethod
    def backbone(cls, contract_world):
        from ..builtin.open_clip_backbone import OpenClipOptions, build_open_clip

        torch.manual_seed(0)
        return build_open_clip(OpenClipOptions(model=str(contract_world["config"]), pretrained=None))

    @pytest.fixture(scope="class")
    @classmethod
    def entry(cls, contract_registry):
        return contract_registry.get("method", cls.method)

    def build(self, entry, backbone, case: Case, names=NAMES, seed: int = 0, fitted: bool = True) -> PromptMethod:
        """The method as the engine builds it: with the options it says it uses on this
        backbone (:meth:`~vlprompt_core.api.PromptMethod.effective_options`), and (unless
        ``fitted=False``) fitted by its ``before_training`` / ``after_training`` hooks on
        :func:`~vlprompt_core.testing.synthetic_frozen_data` of ``names``."""
        options = entry.effective(entry.options.model_validate(case.options), BackboneInfo.of(backbone)).options
        torch.manual_seed(seed)
        method = entry.make(backbone, ClassSet(list(names)), options)
        if fitted and _fits(method):
            data = synthetic_frozen_data(backbone, ClassSet(list(names)))
            method.eval()
            method.before_training(data)
            method.after_training(data)
        return method

    def batch(self, method: PromptMethod, n: int = 3, seed: int = 0, labels=True) -> Batch:
        bb = method.backbone
        images = _images(n, bb.image_size, seed)
        feats = bb.encode_image(images).detach() if "image_features" in method.inputs else None
        return Batch(images=images if "images" in method.inputs else None, image_features=feats,
                     labels=torch.arange(n) % 2 if labels else None)

    # ---------------------------------------------------------------- tests
    def test_options_reject_unknown_keys(self, entry):
        from pydantic import ValidationError

        with pytest.raises(ValidationError):
            entry.options.model_validate({"surely_not_an_option": 1})

    def test_forward_gives_finite_scores_per_class(self, entry, backbone, case):
        method = self.build(entry, backbone, case)
        for mode in (True, False):
            method.train(mode)
            scores = _scores(method, self.batch(method))
            assert scores.shape == (3, len(NAMES)), f"scores {list(scores.shape)} in {'train' if mode else 'eval'} mode"
            assert torch.isfinite(scores).all()

    def test_trainable_parameters_belong_to_the_method(self, entry, backbone, case):
        method = self.build(entry, backbone, case)
        trainable = [n for n, p in method.named_parameters() if p.requires_grad]
        assert not [n for n in trainable if n.startswith("backbone.")], "backbone weights must stay frozen"
        assert all(not p.requires_grad for p in backbone.parameters())
        for n, p in method.named_parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32, f"{n} is {p.dtype}; trainable parameters are fp32"

    def test_the_backbone_is_out_of_the_methods_reach(self, entry, backbone, case):
        method = self.build(entry, backbone, case)
        assert method.backbone is backbone
        frozen = {t.data_ptr() for t in [*backbone.parameters(), *backbone.buffers()] if t.numel()}
        own = [(n, t) for n, t in [*method.named_parameters(), *method.named_buffers(),
                                   *method.state_dict().items()] if isinstance(t, torch.Tensor)]
        reached = sorted({n for n, t in own if t.numel() and t.data_ptr() in frozen})
        assert not reached, f"backbone tensors reachable through the method: {reached[:5]}"
        inside = {id(m) for m in backbone.modules()}
        visited: list = []
        method.apply(visited.append)
        assert not [m for m in visited if id(m) in inside], "method.apply() reaches the backbone's modules"
        dtypes = {k: v.dtype for k, v in backbone.state_dict().items()}
        try:
            method.half()
            changed = sorted(k for k, v in backbone.state_dict().items() if v.dtype != dtypes[k])
            assert not changed, f"method.half() changed the backbone ({changed[:3]}...)"
        finally:  # never leave the class's backbone (fp32) changed for the tests after this one
            backbone.float()

    def test_gradients_reach_every_trainable_parameter(self, entry, backbone, case):
        method = self.build(entry, backbone, case)
        params = {n: p for n, p in method.named_parameters() if p.requires_grad}
        if not params:
            pytest.skip("the method has no trainable parameters")
        method.train()
        batch = self.batch(method)
        torch.manual_seed(0)
        method.loss(method(batch), batch).backward()
        dead = [n for n, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
        assert not dead, f"no gradient reaches {dead}"
        assert all(p.grad is None for p in backbone.parameters()), "a backbone weight got a gradient"
        method.zero_grad(set_to_none=True)

    def test_a_step_changes_trainable_parameters_and_nothing_else(self, entry, backbone, case):
        from ..engine import make_optimizer, optimizer_groups
        from ..spec import TrainSpec

        method = self.build(entry, backbone, case)
        params = {n for n, p in method.named_parameters() if p.requires_grad}
        if not params:
            pytest.skip("the method has no trainable parameters")
        before = {k: v.detach().clone() for k, v in method.state_dict(keep_vars=True).items()}
        backbone_before = {k: v.clone() for k, v in backbone.state_dict().items()}
        optimizer = make_optimizer(optimizer_groups(method), TrainSpec(lr=0.1))
        method.train()
        batch = self.batch(method)
        torch.manual_seed(0)
        out = method(batch)
        method.backward(method.loss(out, batch), out, batch)  # as the engine steps: the method's own backward
        optimizer.step()
        method.zero_grad(set_to_none=True)
        after = method.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed, "one optimiser step changed nothing"
        assert changed <= params, f"changed but not trainable: {sorted(changed - params)}"
        for k, v in backbone_before.items():
            assert torch.equal(backbone.state_dict()[k], v), f"backbone weight {k} changed"

    def test_set_classes_to_another_class_count(self, entry, backbone, case):
        method = self.build(entry, backbone, case)
        method.eval()
        batch = self.batch(method, labels=False)
        if case.fixed_classes:
            with pytest.raises(UserError) as exc:
                method.set_classes(ClassSet(OTHER_NAMES))
            assert len(exc.value.problems) == 1 and "\n" not in exc.value.problems[0]
            return
        method.set_classes(ClassSet(OTHER_NAMES))
        assert _scores(method, batch).shape == (3, len(OTHER_NAMES))
        method.set_classes(ClassSet(NAMES))
        assert _scores(method, batch).shape == (3, len(NAMES))

    def test_fixed_classes_is_told_before_anything_is_built(self, entry, backbone, case):
        """A case that cannot score other classes says so in one line from its options alone
        (``fixed_classes``), so that validate refuses base-to-novel and ``method: all`` leaves it out."""
        options = entry.effective(entry.options.model_validate(case.options), BackboneInfo.of(backbone)).options
        why = getattr(entry.build, "fixed_classes", lambda o: None)(options)
        if case.fixed_classes:
            assert isinstance(why, str) and why and "\n" not in why, "fixed_classes(options) must give one line"
        else:
            assert why is None, f"fixed_classes says {why!r} for a case that scores other classes"

    def test_permuting_class_names_permutes_scores(self, entry, backbone, case):
        if case.fixed_classes:
            pytest.skip("the method scores only the classes it was built for")
        method = self.build(entry, backbone, case)
        method.eval()
        batch = self.batch(method, labels=False)
        scores = _scores(method, batch)
        order = [2, 0, 3, 1]
        method.set_classes(ClassSet([NAMES[i] for i in order]))
        permuted = _scores(method, batch)
        assert torch.allclose(permuted, scores[:, order], atol=self.atol, rtol=1e-4), \
            "set_classes must rebuild the classifier from the new names"

    def test_checkpoint_round_trip_gives_identical_scores(self, entry, backbone, case, tmp_path):
        from ..engine import load_checkpoint, save_checkpoint

        trained = self.build(entry, backbone, case, seed=0)
        params = {n: p for n, p in trained.named_parameters() if p.requires_grad}
        if not params and not trained.fitted_tensors():
            pytest.skip("the method has no trainable parameters and no fitted tensors")
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in params.values():  # away from any initial value
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        meta = {"method": self.method, "options": json.dumps(case.options, sort_keys=True)}
        path = tmp_path / "ckpt.safetensors"
        save_checkpoint(trained, path, meta)
        fresh = self.build(entry, backbone, case, seed=1, fitted=False)
        load_checkpoint(fresh, path, meta)
        trained.eval()
        fresh.eval()
        batch = self.batch(trained, labels=False)
        assert torch.equal(_scores(trained, batch), _scores(fresh, batch))

    def test_fitting_is_deterministic_and_leaves_the_backbone_alone(self, entry, backbone, case):
        if not _fits(self.build(entry, backbone, case, fitted=False)):
            pytest.skip("the method has no before_training / after_training")
        frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
        first, second = (self.build(entry, backbone, case) for _ in range(2))
        for k, v in frozen.items():
            assert torch.equal(backbone.state_dict()[k], v), f"fitting changed backbone weight {k}"
        a, b = first.state_dict(), second.state_dict()
        differ = sorted(k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k]))
        assert not differ, f"fitting twice with the same seed and data gave different {differ}"
        buffers = dict(first.named_buffers())
        assert not [n for n in first.fitted_tensors() if n in buffers and buffers[n].requires_grad], \
            "a fitted buffer needs grad (train a fitted nn.Parameter instead)"


assert len(COLOURS) == 6  # the generated datasets have 6 classes, 3 test images each
