"""The method contract through the engine: one batch object, the optional training
hooks (parameter groups, loss, prediction rule, epoch end), the eval cache, and
visual prompts that get images and frozen features of the same batch."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from toy_methods import HooksOptions, ToyHooks, ToyVisualPrompt
from vlprompt_core.api import Batch, ClassSet, ContractError, ParamGroup
from vlprompt_core.engine import Engine, lr_at, optimizer_groups
from vlprompt_core.errors import UserError
from vlprompt_core.plugins import Registry
from vlprompt_core.spec import check_spec, validate_spec


@pytest.fixture(scope="module")
def reg(toy_registry):
    return toy_registry


def spying(reg: Registry, store: dict) -> Registry:
    """``reg`` whose builders keep what they built, and count frozen image encodes."""
    entries = {kind: dict(v) for kind, v in reg.entries.items()}
    backbone = entries["backbone"]["open_clip"]

    def build_backbone(opts):
        bb = backbone.build(opts)
        encode = bb.encode_image

        def counted(images):
            store["encodes"].append(images)
            return encode(images)

        bb.encode_image = counted
        store["backbone"] = bb
        store["backbone_before"] = {k: v.clone() for k, v in bb.state_dict().items()}
        return bb

    entries["backbone"]["open_clip"] = dataclasses.replace(backbone, build=build_backbone)
    for name, entry in reg.entries["method"].items():
        def build(bb, classes, opts, _entry=entry):
            m = _entry.build(bb, classes, opts)
            store["methods"].append(m)
            return m

        entries["method"][name] = dataclasses.replace(entry, build=build)
    return Registry(entries=entries, sources=reg.sources, failures=reg.failures, pm=reg.pm)


def run(world, reg, tmp_path, method, protocol=None, **train):
    store = {"encodes": [], "methods": []}
    spy = spying(reg, store)
    data = {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method,
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": protocol or {"name": "few_shot", "shots": 2},
        "train": {"epochs": 2, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32", **train},
        "output": str(tmp_path / "out"),
    }
    spec = validate_spec(data, spy)
    check_spec(spec, spy)
    store["record"] = Engine(spec, spy).run()
    return store


# ------------------------------------------------------------- visual prompts


def test_visual_method_gets_images_and_frozen_features_of_the_same_batch(world, reg, tmp_path):
    store = run(world, reg, tmp_path, {"name": "toy_visual"})
    (method,) = store["methods"]
    assert isinstance(method, ToyVisualPrompt)
    n_train = 6 * 2  # 6 classes x 2 shots
    train_batches = 2 * math.floor(n_train / 4)  # 2 epochs, drop_last
    train_seen = method.seen[:train_batches]
    assert len(method.seen) == train_batches + 1  # then one evaluation batch of 18 test images
    # one frozen-feature computation per training batch, on exactly the images the method got
    train_encodes = store["encodes"][:train_batches]
    assert len(store["encodes"]) == train_batches + 1  # + the test split's features, once
    for (images, feats), encoded in zip(train_seen, train_encodes):
        assert images.shape == (4, 3, 16, 16) and encoded is images
        with torch.no_grad():
            assert torch.equal(feats, store["backbone"].model.encode_image(images))
    # evaluation: the test images with their cached frozen features, aligned
    images, feats = method.seen[-1]
    assert images.shape[0] == feats.shape[0] == 18
    with torch.no_grad():
        assert torch.allclose(feats, store["backbone"].model.encode_image(images), atol=1e-6)
    # the prompts trained, the backbone did not; the extra loss was logged per epoch
    (r,) = store["record"]["runs"]
    assert all("loss.pull" in e and e["loss.pull"] > 0 for e in r["epochs"])
    assert r["cost"]["trainable_parameters"] == 2 * 32
    for k, v in store["backbone_before"].items():
        assert torch.equal(store["backbone"].state_dict()[k], v), k


def test_visual_prompts_with_zero_tokens_give_the_frozen_feature(tiny_backbone):
    bb = tiny_backbone
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = bb.embed_image(images)
    with torch.no_grad():
        out = bb.encode_image_tokens(torch.cat([x[:, :1], x[:, 1:1], x[:, 1:]], dim=1))
        assert torch.allclose(out, bb.encode_image(images), atol=1e-6)
        # with tokens inserted the feature changes (the check above could fail)
        extra = torch.cat([x[:, :1], torch.ones(3, 2, bb.vision_width), x[:, 1:]], dim=1)
        assert not torch.allclose(bb.encode_image_tokens(extra), bb.encode_image(images), atol=1e-3)


def test_visual_method_on_a_resnet_is_one_clear_line(world, reg, tmp_path):
    import json

    cfg = tmp_path / "tiny_rn.json"
    cfg.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    data = {
        "backbone": {"name": "open_clip", "model": str(cfg), "pretrained": None},
        "method": [{"name": "zeroshot"}, {"name": "toy_visual"}],
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 1},
        "train": {"epochs": 1, "seeds": [1], "device": "cpu"},
        "output": str(tmp_path / "out"),
    }
    spec = validate_spec(data, reg)
    with pytest.raises(UserError) as exc:
        Engine(spec, reg).run()
    (line,) = exc.value.problems
    assert line.startswith("method 'toy_visual' (toy_visual) needs a ViT image tower")
    assert "ModifiedResNet" in line
    record = json.loads((tmp_path / "out" / "results.json").read_text())  # nothing ran, and the record says why
    assert record["status"] == "failed" and record["runs"] == [] and "needs a ViT image tower" in record["error"]


# ------------------------------------------------------------- training hooks


def test_parameter_groups_lr_scale_and_weight_decay(world, reg, tmp_path):
    store = run(world, reg, tmp_path, {"name": "toy_hooks", "head_lr_scale": 10.0}, lr=0.01, weight_decay=0.01,
                epochs=3)
    (method,) = store["methods"]
    groups = optimizer_groups(method)
    assert [len(g.params) for g in groups] == [1, 1]
    from vlprompt_core.engine import make_optimizer
    from vlprompt_core.spec import TrainSpec

    settings = TrainSpec(lr=0.01, weight_decay=0.01, epochs=3)
    opt = make_optimizer(groups, settings)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 10.0]
    # the engine scheduled both groups, the head at 10x: the logged lr is the base lr
    (r,) = store["record"]["runs"]
    assert [e["lr"] for e in r["epochs"]] == [lr_at(e, settings) for e in range(3)]


def test_head_lr_scale_changes_the_head_update(world, reg, tmp_path):
    """The same run with the head at 1x and 10x: the ctx group is untouched by the
    scale, the head moves further (a real effect of the group, not just bookkeeping)."""
    slow = run(world, reg, tmp_path / "a", {"name": "toy_hooks", "head_lr_scale": 1.0}, lr=0.01)["methods"][0]
    fast = run(world, reg, tmp_path / "b", {"name": "toy_hooks", "head_lr_scale": 10.0}, lr=0.01)["methods"][0]
    assert fast.head.detach().abs().sum() > 3 * slow.head.detach().abs().sum() > 0


def test_loss_hook_replaces_cross_entropy(world, reg, tmp_path):
    store = run(world, reg, tmp_path, {"name": "toy_hooks"})
    (method,) = store["methods"]
    (r,) = store["record"]["runs"]
    per_batch = method.losses_seen
    n_batches = 3  # 12 items / batch 4
    assert len(per_batch) == 2 * n_batches
    for epoch in range(2):
        chunk = per_batch[epoch * n_batches:(epoch + 1) * n_batches]
        assert r["epochs"][epoch]["loss"] == pytest.approx(sum(chunk) / n_batches, rel=1e-6)


def test_prediction_rule_is_used_for_accuracy(world, reg, tmp_path):
    store = run(world, reg, tmp_path, {"name": "toy_hooks"})
    (method,) = store["methods"]
    (r,) = store["record"]["runs"]
    labels = torch.tensor([it.label for it in _test_items(world)])
    eval_pred = method.predicted[-1]  # one evaluation batch of all 18 test images
    assert eval_pred.shape == (18,)
    assert r["accuracy"]["test"] == pytest.approx(100 * (eval_pred == labels).float().mean().item())


def _test_items(world):
    from vlprompt_core.plugins import build_registry, make_plugin_manager

    reg = build_registry(*make_plugin_manager())
    opts = reg.get("dataset", "toy").options(root=world["data"])
    return reg.get("dataset", "toy").load(opts).test


def test_on_epoch_end_is_called_after_each_epoch(world, reg, tmp_path):
    store = run(world, reg, tmp_path, {"name": "toy_hooks"}, epochs=3)
    (method,) = store["methods"]
    assert [(e, n) for e, n, _ in method.epochs_seen] == [(0, 3), (1, 3), (2, 3)]
    sums = [s for _, _, s in method.epochs_seen]
    assert sums[0] != sums[1] != sums[2]  # called after the epoch's steps, not before


def test_parameter_groups_must_cover_every_trainable_parameter_once(tiny_backbone):
    m = ToyHooks(tiny_backbone, ClassSet(["a", "b"]), HooksOptions())
    m.parameter_groups = lambda: [ParamGroup([m.ctx])]
    with pytest.raises(ContractError, match="missing: \\['head'\\]"):
        optimizer_groups(m)
    m.parameter_groups = lambda: [ParamGroup([m.ctx, m.head]), ParamGroup([m.head])]
    with pytest.raises(ContractError, match="more than once: \\['head'\\]"):
        optimizer_groups(m)
    frozen = next(tiny_backbone.parameters())
    m.parameter_groups = lambda: [ParamGroup([m.ctx, m.head, frozen])]
    with pytest.raises(ContractError, match="does not train"):
        optimizer_groups(m)


def test_cache_holds_in_eval_and_clears_on_train_and_set_classes(tiny_backbone):
    m = ToyHooks(tiny_backbone, ClassSet(["a", "b"]), HooksOptions())
    calls = []
    m.eval()
    assert m.cached("k", lambda: calls.append(1) or torch.ones(1)).item() == 1
    m.cached("k", lambda: calls.append(1) or torch.ones(1))
    assert len(calls) == 1
    m.set_classes(ClassSet(["c", "d", "e"]))
    m.cached("k", lambda: calls.append(1) or torch.ones(1))
    assert len(calls) == 2
    m.train()
    m.cached("k", lambda: calls.append(1) or torch.ones(1))
    m.cached("k", lambda: calls.append(1) or torch.ones(1))
    assert len(calls) == 4  # training mode never caches


def test_inputs_must_be_known():
    from vlprompt_core.api import PromptMethod

    with pytest.raises(TypeError, match="inputs"):
        type("Bad", (PromptMethod,), {"inputs": ("pixels",)})
    with pytest.raises(TypeError, match="inputs"):
        type("Empty", (PromptMethod,), {"inputs": ()})


def test_batch_length():
    assert len(Batch(labels=torch.zeros(5))) == 5
    assert len(Batch(image_features=torch.zeros(3, 2))) == 3
    assert len(Batch()) == 0


def test_a_method_whose_entry_says_it_does_not_train_but_has_parameters_fails_its_pair(world, reg, tmp_path):
    """``MethodEntry.trains=False`` leaves the training settings out of the method's key;
    a method that says so but has trainable parameters is the plug-in's fault, never
    trained under settings its key ignores."""
    entries = {kind: dict(v) for kind, v in reg.entries.items()}
    entries["method"]["toy_visual"] = dataclasses.replace(entries["method"]["toy_visual"], trains=False)
    untrained = Registry(entries=entries, sources=reg.sources, failures=reg.failures, pm=reg.pm)
    record = run(world, untrained, tmp_path, {"name": "toy_visual"})["record"]
    assert record["status"] == "failed" and not record["runs"]
    (failure,) = record["failures"]
    assert "has trainable parameters or fitted tensors (prompts)" in failure["error"] and "trains=False" in failure["error"]


# ------------------------------------------------------------- gradient hook


class GradShapingOptions(HooksOptions):
    pass


class ToyGradShaping(ToyHooks):
    """ToyHooks whose ``backward`` keeps the context's gradient and drops the head's: the
    head (ones, with weight decay) never moves, the context does."""

    def __init__(self, backbone, classes, options):
        super().__init__(backbone, classes, options)
        with torch.no_grad():
            self.head.fill_(1.0)
        self.ctx_start = self.ctx.detach().clone()
        self.backward_calls: list[tuple[float, float]] = []

    def parameter_groups(self):
        return [ParamGroup([self.ctx]), ParamGroup([self.head], weight_decay=0.5)]

    def backward(self, loss, output, batch):
        self.backward_calls.append((float(loss.detach()), self.losses_seen[-1]))
        assert self.ctx.grad is None and self.head.grad is None  # zeroed before the hook
        loss.backward()
        self.head.grad = None  # no gradient: the optimiser leaves it, weight decay included


def test_backward_hook_shapes_the_step(world, reg, tmp_path):
    from vlprompt_core.api import MethodEntry

    grads = Registry(entries={k: dict(v) for k, v in reg.entries.items()}, sources=dict(reg.sources),
                     failures=reg.failures, pm=reg.pm)
    grads.entries["method"]["toy_grads"] = MethodEntry("toy_grads", GradShapingOptions, ToyGradShaping, "toy grads")
    grads.sources[("method", "toy_grads")] = reg.sources[("method", "toy_hooks")]
    store = run(world, grads, tmp_path, {"name": "toy_grads"}, lr=0.01, epochs=2)
    (method,) = store["methods"]
    n_steps = 2 * 3  # 2 epochs of 12 items / batch 4
    assert len(method.backward_calls) == n_steps
    assert all(given == logged for given, logged in method.backward_calls)  # the loss the method computed
    assert torch.equal(method.head.detach(), torch.ones_like(method.head))  # never stepped: the hook's choice
    assert not torch.equal(method.ctx.detach(), method.ctx_start)  # the context stepped as usual
    (r,) = store["record"]["runs"]
    assert r["epochs"][0]["loss"] == pytest.approx(sum(c[0] for c in method.backward_calls[:3]) / 3, rel=1e-6)


def test_default_backward_is_loss_backward(tiny_backbone):
    m = ToyHooks(tiny_backbone, ClassSet(["a", "b"]), HooksOptions())
    batch = Batch(image_features=torch.randn(3, tiny_backbone.embed_dim), labels=torch.tensor([0, 1, 1]))
    out = m(batch)
    loss = m.loss(out, batch)
    expected = torch.autograd.grad(loss, [m.ctx, m.head], retain_graph=True)
    m.backward(loss, out, batch)
    assert torch.equal(m.ctx.grad, expected[0]) and torch.equal(m.head.grad, expected[1])


def test_the_gradient_hook_example_in_the_docs_runs(tiny_backbone):
    """The code block under "Shaping a step's gradients" in docs/writing-plugins.md, mixed into
    a toy method: a conflicting gradient loses its component along the guide's, an agreeing
    one is kept."""
    import re
    from pathlib import Path

    from vlprompt_core.api import MethodOutput

    text = (Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md").read_text()
    code = re.search(r"### Shaping a step's gradients\n.*?```python\n(.*?)```", text, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "writing-plugins.md", "exec"), namespace)

    class Guided(namespace["AlignedStep"], ToyHooks):
        def forward(self, batch):
            out = super().forward(batch)
            target = self.target
            return MethodOutput(out.logits, losses={"guide": (self.ctx - target).pow(2).sum()})

    m = Guided(tiny_backbone, ClassSet(["a", "b"]), HooksOptions())
    batch = Batch(image_features=torch.randn(4, tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(0)),
                  labels=torch.tensor([0, 1, 1, 0]))
    for sign in (1.0, -1.0):  # a guide pulling along, then against, the cross-entropy's step
        m.zero_grad(set_to_none=True)
        out = ToyHooks.forward(m, batch)
        g_ce = torch.autograd.grad(F.cross_entropy(out.logits, batch.labels), m.ctx)[0]
        m.target = (m.ctx + sign * g_ce).detach()  # guide gradient: -2 sign g_ce
        out = m(batch)
        loss = m.loss(out, batch)
        m.backward(loss, out, batch)
        if sign > 0:  # the guide's gradient, -2 g_ce, points against g_ce: all of g_ce is removed
            assert m.ctx.grad.abs().max() < 1e-6 * g_ce.abs().max()
        else:  # +2 g_ce agrees: the cross-entropy's own gradient
            assert torch.allclose(m.ctx.grad, g_ce, atol=1e-7)
