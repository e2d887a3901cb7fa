"""The optimisers of ``train.optimizer`` (engine/optim.py): the class and settings each is
built with, Adam's step by hand, the schedule they share, the ``adam_eps`` setting, and
that adding it left the result keys of earlier runs as they were."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import BaseModel

from vlprompt_core.api import ParamGroup
from vlprompt_core.engine import lr_at, make_optimizer
from vlprompt_core.errors import UserError
from vlprompt_core.recipes import ResolvedMethod, method_key
from vlprompt_core.settings import TrainOverride, TrainSpec
from vlprompt_core.spec import build_spec_model, validate_spec


def groups():
    torch.manual_seed(0)
    ctx = torch.nn.Parameter(torch.randn(4, 3))
    head = torch.nn.Parameter(torch.randn(3))
    return [ParamGroup([ctx]), ParamGroup([head], lr_scale=10.0, weight_decay=0.0)]


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_each_optimizer_is_built_with_its_class_and_settings(name, cls):
    settings = TrainSpec(optimizer=name, lr=0.01, weight_decay=0.02, adam_eps=1e-3, momentum=0.5)
    opt = make_optimizer(groups(), settings)
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.0]  # a group's own decay wins
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 10.0]
    assert all(g["lr"] == 0.01 for g in opt.param_groups)
    if name == "sgd":
        assert opt.defaults["momentum"] == 0.5 and opt.defaults["dampening"] == 0 and not opt.defaults["nesterov"]
        assert "eps" not in opt.defaults  # sgd ignores adam_eps, as adam ignores momentum
    else:  # Dassl's ADAM_BETA1/2 defaults
        assert opt.defaults["eps"] == 1e-3 and opt.defaults["betas"] == (0.9, 0.999)
        assert not opt.defaults["amsgrad"] and "momentum" not in opt.defaults


def test_adamw_is_as_before_by_default():
    """``adam_eps`` defaults to torch's eps: AdamW is built as it was before the setting existed."""
    (p,) = groups()[0].params
    opt = make_optimizer([ParamGroup([p])], TrainSpec(optimizer="adamw"))
    before = torch.optim.AdamW([{"params": [p], "lr_scale": 1.0, "weight_decay": 5e-4}], lr=0.002, weight_decay=5e-4)
    assert TrainSpec().adam_eps == 1e-8
    assert opt.defaults == before.defaults and opt.param_groups[0].keys() == before.param_groups[0].keys()
    assert all(opt.param_groups[0][k] == before.param_groups[0][k] for k in opt.param_groups[0] if k != "params")


def adam_by_hand(p, grads, lr, wd, eps, betas=(0.9, 0.999)):
    """torch.optim.Adam's update (Dassl's 'adam'): L2 decay added to the gradient, bias-corrected moments."""
    p = p.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g + wd * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_adam_steps_equal_torch_adam_by_hand(eps):
    torch.manual_seed(1)
    start = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) * s for s in (1e-4, 1.0, 1e-2)]  # small ones: eps matters
    settings = TrainSpec(optimizer="adam", lr=0.01, weight_decay=0.1, adam_eps=eps)
    p = torch.nn.Parameter(start.clone())
    opt = make_optimizer([ParamGroup([p])], settings)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = adam_by_hand(start, grads, 0.01, 0.1, eps)
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-12)
    # the decay is coupled (Adam), not decoupled (AdamW): AdamW's steps differ
    q = torch.nn.Parameter(start.clone())
    adamw = make_optimizer([ParamGroup([q])], settings.model_copy(update={"optimizer": "adamw"}))
    for g in grads:
        q.grad = g.clone()
        adamw.step()
    assert not torch.allclose(q.detach(), expected, rtol=0, atol=1e-6)


def test_eps_sets_the_step_for_small_gradients():
    """The first step is lr * g / (|g| + eps): about lr with eps 1e-8, a tenth of it with eps 1e-3 at |g| 1e-4."""
    steps = {}
    for eps in (1e-8, 1e-3):
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = make_optimizer([ParamGroup([p])], TrainSpec(optimizer="adam", lr=0.01, weight_decay=0.0, adam_eps=eps))
        p.grad = torch.full_like(p, 1e-4)
        opt.step()
        steps[eps] = -p.item()
    assert math.isclose(steps[1e-8], 0.01 * 1e-4 / (1e-4 + 1e-8))
    assert math.isclose(steps[1e-3], 0.01 * 1e-4 / (1e-4 + 1e-3))


def test_adam_follows_the_same_schedule():
    """Warm-up, then cosine from lr: the schedule does not depend on the optimiser (Dassl's
    ConstantWarmupScheduler over CosineAnnealingLR for any OPTIM.NAME)."""
    kw = {"lr": 0.002, "epochs": 50, "warmup_epochs": 1, "warmup_lr": 1e-5}
    sgd, adam = TrainSpec(optimizer="sgd", **kw), TrainSpec(optimizer="adam", adam_eps=1e-3, **kw)
    assert [lr_at(e, adam) for e in range(50)] == [lr_at(e, sgd) for e in range(50)]
    assert lr_at(0, adam) == 1e-5 and lr_at(1, adam) == 0.002
    assert math.isclose(lr_at(26, adam), 0.002 * (1 + math.cos(math.pi * 25 / 50)) / 2)


def test_warm_up_sets_every_group_to_the_warm_up_rate_then_groups_scale_the_schedule():
    """Dassl's constant warm-up gives every parameter group the warm-up rate itself (a
    group trained at 6.5x the base rate, as DePT's head, warms up at 1e-5 too)."""
    from vlprompt_core.engine.optim import set_lr

    opt = make_optimizer(groups(), TrainSpec(lr=0.002))
    set_lr(opt, 1e-5, warmup=True)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-5]
    set_lr(opt, 0.002)
    assert [g["lr"] for g in opt.param_groups] == [0.002, 0.002 * 10.0]


@pytest.mark.parametrize("value", [0, -1e-3, float("inf"), float("nan"), "x"])
def test_adam_eps_must_be_a_positive_finite_number(value):
    with pytest.raises(ValueError):
        TrainSpec(adam_eps=value)


def test_a_wrong_adam_eps_is_one_line_naming_the_field(world, registry):
    data = {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "coop", "n_ctx": 4},
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        "train": {"optimizer": "adam", "adam_eps": 0, "seeds": [1]},
    }
    with pytest.raises(UserError) as exc:
        validate_spec(data, registry, "spec")
    (line,) = exc.value.problems
    assert line.startswith("spec: train.adam_eps: ") and "greater than 0" in line and "\n" not in line
    data["train"]["adam_eps"] = 1e-3
    assert validate_spec(data, registry).train.adam_eps == 1e-3
    assert "adam_eps" in TrainOverride.model_fields  # a method section may set it too


def test_schema_shows_adam_and_adam_eps(registry):
    train = build_spec_model(registry).model_json_schema()["$defs"]["TrainSpec"]["properties"]
    assert train["adam_eps"]["default"] == 1e-8 and train["adam_eps"]["exclusiveMinimum"] == 0
    assert "adam" in train["adam_eps"]["description"]
    assert set(train["optimizer"]["enum"]) == {"sgd", "adam", "adamw"}


# ------------------------------------------------------------------ result keys


class _Part(BaseModel):
    name: str
    extra: int = 1


class _Options(BaseModel):
    name: str = "m"
    n_ctx: int = 4


#: Keys of a fixed spec, recorded before ``adam_eps`` existed: (train, key, key of a method that does not train).
KEYS_BEFORE_ADAM_EPS = [
    ({}, "99ef36d5392d", "2d921c9e1088"),
    ({"optimizer": "adamw", "lr": 0.002}, "73f617a240df", "2d921c9e1088"),
    ({"optimizer": "sgd", "momentum": 0.5}, "c79f1250737f", "2d921c9e1088"),
]


def _key(trains=True, **train) -> str:
    spec = SimpleNamespace(backbone=_Part(name="bb"), dataset=_Part(name="ds"), protocol=_Part(name="few_shot"))
    resolved = ResolvedMethod(label="m", name="m", options=_Options(), train=TrainSpec(device="cpu", **train))
    return method_key(spec, resolved, trains)


@pytest.mark.parametrize("train, key, untrained", KEYS_BEFORE_ADAM_EPS)
def test_keys_of_earlier_runs_are_unchanged(train, key, untrained):
    assert _key(**train) == key
    assert _key(False, **train) == untrained
    assert _key(adam_eps=1e-8, **train) == key  # written out at its default: the same runs


def test_adam_eps_keys_only_when_set_and_only_training():
    assert _key(optimizer="adam") != _key(optimizer="adamw") != _key()
    assert _key(optimizer="adam", adam_eps=1e-3) != _key(optimizer="adam")
    assert _key(False, optimizer="adam", adam_eps=1e-3) == _key(False)  # a method that does not train: never read


# ------------------------------------------------------- per-step cosine, min_lr


@pytest.mark.parametrize("min_lr", [0.0, 1e-6])
def test_per_step_cosine_is_torchs_cosine_annealing_stepped_every_iteration(min_lr):
    """``schedule_per: step`` (Tip-Adapter-F, CLIP-LoRA): step s of the run at the rate torch's
    CosineAnnealingLR(T_max = epochs x steps, eta_min = min_lr) gives after s scheduler steps."""
    epochs, steps = 3, 5
    settings = TrainSpec(lr=1e-3, epochs=epochs, warmup_epochs=0, schedule_per="step", min_lr=min_lr)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps, eta_min=min_lr)
    for epoch in range(epochs):
        for step in range(steps):
            assert math.isclose(lr_at(epoch, settings, step, steps), opt.param_groups[0]["lr"], rel_tol=1e-9,
                                abs_tol=1e-15), (epoch, step)
            opt.step()
            sched.step()


def test_per_epoch_schedule_with_a_floor_and_without_is_as_before():
    kw = {"lr": 0.002, "epochs": 10, "warmup_epochs": 1}
    plain, floored = TrainSpec(**kw), TrainSpec(min_lr=1e-4, **kw)
    assert [lr_at(e, plain, 3, 7) for e in range(10)] == [lr_at(e, plain) for e in range(10)]  # the step: ignored
    assert lr_at(5, plain) == 0.002 * (1 + math.cos(math.pi * 4 / 10)) / 2  # bit for bit the old formula
    assert math.isclose(lr_at(5, floored), 1e-4 + (0.002 - 1e-4) * (1 + math.cos(math.pi * 4 / 10)) / 2)
    assert lr_at(0, floored) == 1e-5  # warm-up untouched


def test_schedule_per_and_min_lr_key_only_when_set():
    assert _key(schedule_per="epoch", min_lr=0.0) == _key()
    assert _key(schedule_per="step") != _key() and _key(min_lr=1e-6) != _key()
    assert _key(False, schedule_per="step", min_lr=1e-6) == _key(False)  # a method that does not train


@pytest.mark.parametrize("budget", [None, 4])
def test_a_step_schedule_sets_the_rate_before_every_step(world, registry, tmp_path, budget):
    """Through the engine: with schedule_per: step each optimiser step runs at its own rate;
    with a budget of ``train.steps`` the run makes exactly that many steps (the last epoch cut
    short) and the cosine spans them."""
    from vlprompt_core.engine import Engine
    from vlprompt_core.spec import check_spec

    seen = []
    orig = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    spec = validate_spec({
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "coop", "n_ctx": 2}, "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        "train": {"epochs": 2, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32",
                  "warmup_epochs": 0, "lr": 0.01, "schedule_per": "step", "min_lr": 0.001,
                  **({"steps": budget} if budget else {})},
        "output": str(tmp_path / "out"),
    }, registry)
    check_spec(spec, registry)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", spy)
        Engine(spec, registry).run()
    total = budget or 6  # 12 training images, batches of 4: 3 steps an epoch, two epochs
    expected = [0.001 + 0.009 * (1 + math.cos(math.pi * s / total)) / 2 for s in range(total)]
    assert len(seen) == total and all(math.isclose(a, b) for a, b in zip(seen, expected))


def test_epochs_in_the_spec_beat_a_recipes_budget_of_steps(world, monkeypatch):
    """A recipe that trains for a number of steps (CLIP-LoRA) gives way to epochs the user wrote
    (the quickstart's 8 epochs for everyone); steps written in the spec stay."""
    from vlprompt_core import hookimpl
    from vlprompt_core.api import MethodEntry, Options, PromptMethod, Recipe
    from vlprompt_core.plugins import build_registry, make_plugin_manager
    from vlprompt_core.spec import resolve_methods

    class Plugin:
        @hookimpl
        def vlprompt_methods(self):
            return [MethodEntry("budget", Options, PromptMethod, recipe=Recipe(train={"steps": 800, "lr": 2e-4}))]

    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
    reg = build_registry(*make_plugin_manager(extra=(("budget", Plugin()),)))

    def resolved(**train):
        spec = validate_spec({
            "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
            "method": {"name": "budget"}, "dataset": {"name": "toy", "root": str(world["data"])},
            "protocol": {"name": "few_shot", "shots": 2}, "train": {"device": "cpu", **train}}, reg)
        (m,) = resolve_methods(spec, reg)
        return m.train

    assert resolved().steps == 800
    assert resolved(epochs=8).steps is None and resolved(epochs=8).lr == 2e-4
    assert resolved(epochs=8, steps=50).steps == 50
