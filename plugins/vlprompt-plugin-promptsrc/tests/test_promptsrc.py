"""PromptSRC on a tiny random open_clip backbone (16 px images, width 32, 2 blocks per tower)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core import hookimpl
from vlprompt_core.api import BackboneInfo, Batch, ClassSet
from vlprompt_core.errors import UserError
from vlprompt_core.testing import Case, MethodContract, make_world, tiny_backbone
from vlprompt_plugin_promptsrc import RECIPE, TEACHER_TEMPLATES, PromptSRC, PromptSRCOptions, gpa_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAMES = ["red", "green", "apple pie", "blue"]


@pytest.fixture(scope="module")
def _backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("promptsrc_bb"))


@pytest.fixture()
def bb(_backbone):
    """The frozen backbone (shared; tests must not modify its weights)."""
    _backbone.zero_grad(set_to_none=True)
    return _backbone


def build(bb, names=NAMES, **opts) -> PromptSRC:
    torch.manual_seed(0)
    return PromptSRC(bb, ClassSet(list(names)), PromptSRCOptions(**opts))


def batch(bb, n=3, labels=(0, 2, 3), seed=0) -> Batch:
    images = torch.randn(n, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        feats = bb.encode_image(images)
    return Batch(images=images, image_features=feats, labels=torch.tensor(labels[:n]))


# ------------------------------------------------------------------ options


def info(bb) -> BackboneInfo:
    return BackboneInfo.of(bb)


def test_depths_are_clamped_to_the_towers_and_said(bb):
    used = PromptSRC.effective_options(PromptSRCOptions(), info(bb))  # the recipe's 9 + 9 on 2 + 2 blocks
    assert (used.options.prompt_depth_text, used.options.prompt_depth_vision) == (2, 2)
    assert used.notes == ("prompt_depth_text 9 -> 2: the text tower has 2 blocks",
                          "prompt_depth_vision 9 -> 2: the image tower has 2 blocks")
    same = PromptSRC.effective_options(PromptSRCOptions(prompt_depth_text=1, prompt_depth_vision=2), info(bb))
    assert same.notes == () and same.options.prompt_depth_text == 1
    unknown = PromptSRC.effective_options(PromptSRCOptions(), BackboneInfo())  # nothing known: kept as asked
    assert unknown.options.prompt_depth_text == 9 and unknown.notes == ()


@pytest.mark.parametrize("n_ctx, words, message", [
    (5, "a photo of a", "between 1 and the 4 tokens"),
    (1, "a photograph", None),
    (3, "a photo", "between 1 and the 2 tokens"),
])
def test_ctx_init_longer_than_its_words_is_a_user_error(bb, n_ctx, words, message):
    opts = PromptSRCOptions(n_ctx_text=n_ctx, ctx_init=words)
    if message is None:
        PromptSRC.effective_options(opts, info(bb))
        return
    with pytest.raises(UserError, match=message) as exc:
        PromptSRC.effective_options(opts, info(bb))
    assert "n_ctx_text" in str(exc.value) and "\n" not in str(exc.value)


def test_recipe_values_per_protocol_and_dataset():
    b2n = RECIPE.for_context({"protocol": "base2novel", "dataset": "dtd", "shots": 16})
    assert b2n[0]["epochs"] == 20 and b2n[0]["batch_size"] == 4 and b2n[0]["lr"] == 0.0025
    assert (b2n[1]["prompt_depth_text"], b2n[1]["gpa_mean"], b2n[1]["gpa_std"]) == (9, 15.0, 1.0)
    xd = RECIPE.for_context({"protocol": "cross_dataset", "dataset": "imagenet", "shots": 16})
    assert (xd[0]["epochs"], xd[1]["prompt_depth_vision"], xd[1]["gpa_mean"], xd[1]["gpa_std"]) == (20, 3, 6.0, 10.0)
    dg = RECIPE.for_context({"protocol": "domain_generalisation", "dataset": "imagenet", "shots": 16})
    assert dg == xd
    fs_imagenet = RECIPE.for_context({"protocol": "few_shot", "dataset": "imagenet", "shots": 4})
    fs_dtd = RECIPE.for_context({"protocol": "few_shot", "dataset": "dtd", "shots": 4})
    assert fs_imagenet[0]["epochs"] == fs_dtd[0]["epochs"] == 50
    assert (fs_imagenet[1]["gpa_mean"], fs_imagenet[1]["gpa_std"]) == (30.0, 30.0)
    assert (fs_dtd[1]["gpa_mean"], fs_dtd[1]["gpa_std"]) == (45.0, 5.0)


def test_published_per_dataset_means_are_the_published_average():
    from vlprompt_plugin_promptsrc import vlprompt_methods

    published = vlprompt_methods()[0].published
    b2n = [p for p in published if p.protocol == "base2novel"]
    cells = [p for p in b2n if p.dataset != "average"]
    (average,) = [p for p in b2n if p.dataset == "average"]
    assert len(cells) == 11 and set(average.over) == {p.dataset for p in cells}
    for metric in ("base", "novel"):
        assert abs(sum(p.metrics[metric] for p in cells) / 11 - average.metrics[metric]) < 0.01
    base, novel = average.metrics["base"], average.metrics["novel"]
    assert abs(2 * base * novel / (base + novel) - average.metrics["H"]) < 0.01


# ------------------------------------------------------------------ prompts


def test_trainable_tensors_by_depth(bb):
    m = build(bb, prompt_depth_text=2, prompt_depth_vision=2, n_ctx_vision=3)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}
    assert shapes == {"ctx": (4, 32), "text_deep.0": (4, 32), "vision_ctx": (3, 32), "vision_deep.0": (3, 32)}
    shallow = build(bb, prompt_depth_text=1, prompt_depth_vision=0)
    assert [n for n, p in shallow.named_parameters() if p.requires_grad] == ["ctx"]
    clamped = build(bb)  # 9 + 9 asked of 2 + 2 blocks
    assert len(clamped.text_deep) == len(clamped.vision_deep) == 1


def test_text_prompt_is_the_init_phrase_with_its_first_tokens_learned(bb):
    m = build(bb, n_ctx_text=2)
    ids, slots = m.template.layout(bb, "apple pie")
    whole = bb.tokenize(["a photo of a apple pie."])[0][: len(ids)].tolist()
    assert slots == [-1, 0, 1] + [-1] * (len(ids) - 3)
    assert [i for i, s in zip(ids, slots) if s < 0] == whole[:1] + whole[3:]  # "of a apple pie ." stay words
    assert torch.equal(m.ctx.detach(), bb.embed_tokens(torch.tensor(bb.tokenize_words("a photo"))).float())


def test_without_deep_prompts_the_text_features_are_the_frozen_prompt(bb):
    """ctx = the embeddings of "a photo of a": the prompted text pass is the frozen one."""
    m = build(bb, prompt_depth_text=1)
    with torch.no_grad():
        got = m.text_features()
        ref = bb.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES]))
    assert torch.allclose(got, ref, atol=1e-5)
    deep = build(bb, prompt_depth_text=2)
    with torch.no_grad():
        assert not torch.allclose(deep.text_features(), ref, atol=1e-3)  # block 1 sees its own prompts


def test_image_prompts_enter_before_the_pre_norm_and_are_replaced_at_deeper_blocks(bb):
    """By hand from the backbone's pieces: [cls, patches, prompts] -> ln_pre -> block 0 ->
    last n tokens := vision_deep[0] -> block 1 -> head."""
    m = build(bb, prompt_depth_vision=2, n_ctx_vision=3)
    images = batch(bb).images
    v = bb.model.visual
    with torch.no_grad():
        x = bb.embed_image(images, pre_norm=False)
        x = torch.cat([x, m.vision_ctx.expand(len(images), -1, -1)], dim=1)
        x = v.ln_pre(x)
        x = v.transformer.resblocks[0](x)
        x = torch.cat([x[:, :-3], m.vision_deep[0].expand(len(images), -1, -1)], dim=1)
        x = v.transformer.resblocks[1](x)
        ref = v.ln_post(x[:, 0]) @ v.proj
        assert torch.allclose(m.image_features(images), ref, atol=1e-5)


# ------------------------------------------------------------------ losses


def test_teacher_is_the_mean_of_unnormalised_frozen_features_over_60_templates(bb):
    m = build(bb)
    hand = torch.stack([bb.encode_text(bb.tokenize([t.format(n) for n in NAMES])).float()
                        for t in TEACHER_TEMPLATES]).mean(0)
    hand = hand / hand.norm(dim=-1, keepdim=True)
    assert len(TEACHER_TEMPLATES) == 60 and len(set(TEACHER_TEMPLATES)) == 60
    assert torch.allclose(m.teacher_text_features(), hand, atol=1e-6)


def test_a_class_too_long_for_a_teacher_template_is_a_one_line_user_error(bb):
    name = "very " * 23 + "long"  # 24 tokens: "a photo of a <name>." fits the 32-token context, 10 templates do not
    m = build(bb, names=["red", name])
    m.train()
    with pytest.raises(UserError, match="longer than|tokens") as exc:
        m(batch(bb, n=2, labels=(0, 1)))
    assert name in str(exc.value) and "\n" not in str(exc.value)


def test_teacher_templates_are_openai_s_first_60_with_a_photo_of_a_first():
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    first = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES[:60]]
    assert TEACHER_TEMPLATES[0] == "a photo of a {}."
    assert list(TEACHER_TEMPLATES[1:]) == [t for t in first if t != "a photo of a {}."]


def test_each_loss_term_by_hand(bb):
    m = build(bb, text_loss_weight=25.0, image_loss_weight=10.0)
    m.train()
    b = batch(bb)
    out = m(b)
    with torch.no_grad():
        text = m.text_features()
        text = text / text.norm(dim=-1, keepdim=True)
        image = m.image_features(b.images)
        image = image / image.norm(dim=-1, keepdim=True)
        frozen = b.image_features / b.image_features.norm(dim=-1, keepdim=True)
        teacher = m.teacher_text_features()
        logits = bb.logit_scale * image @ text.T
        zero_shot = bb.logit_scale * frozen @ teacher.T
        # KL(p_zero_shot || p_prompted), summed over every entry, divided by B * C
        p, log_q = zero_shot.softmax(-1), logits.log_softmax(-1)
        kl = (p * (p.log() - log_q)).sum() / logits.numel()
        expected = {"text_l1": 25.0 * (text - teacher).abs().mean(),
                    "image_l1": 10.0 * (image - frozen).abs().mean(), "kl": kl}
    assert torch.allclose(out.logits, logits, atol=1e-5)
    assert set(out.losses) == set(expected)
    for name, value in expected.items():
        assert float(value) > 0, name
        assert math.isclose(float(out.losses[name].detach()), float(value), rel_tol=1e-4, abs_tol=1e-7), name
    ce = F.cross_entropy(logits, b.labels)
    assert math.isclose(float(m.loss(out, b).detach()), float(ce + sum(expected.values())), rel_tol=1e-5)


def test_loss_weights_scale_their_terms_and_eval_has_no_losses(bb):
    b = batch(bb)
    with torch.no_grad():
        one = build(bb, text_loss_weight=1.0, image_loss_weight=1.0).train()(b).losses
        many = build(bb, text_loss_weight=3.0, image_loss_weight=0.0).train()(b).losses
    assert math.isclose(float(many["text_l1"]), 3 * float(one["text_l1"]), rel_tol=1e-6)
    assert float(many["image_l1"]) == 0.0
    assert math.isclose(float(many["kl"]), float(one["kl"]), rel_tol=1e-6)
    assert build(bb).eval()(b).losses == {}


def test_only_prompts_get_gradients(bb):
    m = build(bb)
    m.train()
    b = batch(bb)
    m.loss(m(b), b).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in bb.parameters())


def test_under_bf16_autocast_the_losses_are_close_and_the_targets_stay_fp32(bb):
    b = batch(bb)
    ref = build(bb).train()
    ref_out = ref(b)
    m = build(bb).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(b)
        loss = m.loss(out, b)
    loss.backward()
    assert m.teacher_text_features().dtype == torch.float32
    assert torch.allclose(m.teacher_text_features(), ref.teacher_text_features())  # computed without autocast
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())
    for name in ref_out.losses:
        assert math.isclose(float(out.losses[name].detach()), float(ref_out.losses[name].detach()), rel_tol=0.1), name


# ------------------------------------------------------------------ GPA


def test_gpa_weights_by_hand():
    e = math.exp(-0.5)
    assert gpa_weights(3, 2.0, 1.0) == pytest.approx([e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)], abs=1e-15)
    w = gpa_weights(20, 15.0, 1.0)  # base-to-novel: epoch 15 heaviest, 14 and 16 next
    assert max(range(20), key=w.__getitem__) == 14 and sum(w) == pytest.approx(1.0, abs=1e-12)
    assert w[13] == pytest.approx(w[15]) and w[13] / w[14] == pytest.approx(e)
    far = gpa_weights(2, 45.0, 1.0)  # N(1) and N(2) underflow as densities; their ratio does not
    assert far[1] == pytest.approx(1.0) and far[0] == pytest.approx(math.exp(-0.5 * (44**2 - 43**2)), rel=1e-9)


def test_gpa_aggregates_the_epochs_prompts_and_keeps_the_sum_at_the_end(bb):
    m = build(bb, prompt_depth_text=2, prompt_depth_vision=2, gpa_mean=2.0, gpa_std=1.0)
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    w = gpa_weights(3, 2.0, 1.0)
    for epoch, value in enumerate([1.0, 2.0, 4.0]):
        with torch.no_grad():
            for p in params.values():
                p.fill_(value)
        m.on_epoch_end(epoch, 3)
        if epoch < 2:  # only the sum moves until the last epoch
            assert all(torch.all(p == value) for p in params.values())
    expected = w[0] * 1.0 + w[1] * 2.0 + w[2] * 4.0
    for name, p in params.items():
        assert torch.allclose(p, torch.full_like(p, expected), atol=1e-6), name
    assert abs(expected - 4.0) > 0.5  # the aggregate is not the last epoch's prompts


def test_gpa_sum_is_in_the_state_dict_not_in_the_trainable_tensors(bb):
    m = build(bb, prompt_depth_text=2, prompt_depth_vision=2)
    keys = set(m.state_dict())
    assert {"gpa.ctx", "gpa.text_deep__0", "gpa.vision_ctx", "gpa.vision_deep__0"} <= keys
    assert not any(n.startswith("gpa") for n, _ in m.named_parameters())


# ------------------------------------------------------------------ through the engine


class _StopAt:
    """Ctrl-C at the end of one epoch (as a logger hook sees it), after its state is saved."""

    def __init__(self, epoch):
        self.epoch = epoch

    @hookimpl
    def vlprompt_epoch_end(self, method, seed, epoch, metrics):
        if epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("promptsrc_world"))


def _run(world, out, *extra, epochs=4):
    from vlprompt_core.engine import Engine
    from vlprompt_core.plugins import build_registry, make_plugin_manager
    from vlprompt_core.spec import validate_spec

    os.environ["VLPROMPT_DATASETS_SPEC"] = str(world["specs"])
    registry = build_registry(*make_plugin_manager(extra=extra))
    data = {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "promptsrc", "gpa_mean": 2.5, "gpa_std": 1.0},
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        "train": {"epochs": epochs, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32",
                  "lr": 0.05},
        "output": str(out),
    }
    return Engine(validate_spec(data, registry), registry, log=lambda line: None).run()


def _checkpoint(out):
    from safetensors.torch import load_file

    (path,) = [p for p in (out / "checkpoints").glob("*.safetensors") if not p.name.endswith(".state.safetensors")]
    return load_file(str(path))


@pytest.mark.slow
def test_engine_run_keeps_the_gpa_of_its_epochs_and_survives_a_resume(world, tmp_path, monkeypatch):
    seen: list[dict[str, torch.Tensor]] = []
    original = PromptSRC.on_epoch_end

    def spy(self, epoch, epochs):
        seen.append({n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad})
        original(self, epoch, epochs)

    monkeypatch.setattr(PromptSRC, "on_epoch_end", spy)
    whole = _run(world, tmp_path / "whole")
    monkeypatch.setattr(PromptSRC, "on_epoch_end", original)
    assert whole["status"] == "complete" and len(seen) == 4
    final = _checkpoint(tmp_path / "whole")
    w = gpa_weights(4, 2.5, 1.0)
    for name, tensor in final.items():
        expected = sum(w[e] * seen[e][name] for e in range(4))
        assert torch.allclose(tensor, expected, atol=1e-6), name
        assert not torch.allclose(tensor, seen[-1][name], atol=1e-4), name  # GPA changed the prompts

    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        _run(world, stopped, ("stop", _StopAt(1)))
    assert json.loads((stopped / "results.json").read_text())["status"] == "interrupted"
    resumed = _run(world, stopped)
    assert resumed["status"] == "complete"
    again = _checkpoint(stopped)
    assert all(torch.equal(final[k], again[k]) for k in final)  # bit for bit: the GPA sum was resumed too
    (a,), (b,) = whole["runs"], resumed["runs"]
    assert a["accuracy"] == b["accuracy"]


# ------------------------------------------------------------------ contract


class TestPromptSRCContract(MethodContract):
    method = "promptsrc"
    cases = [
        Case({}, id="recipe-defaults"),
        Case({"prompt_depth_text": 1, "prompt_depth_vision": 0, "n_ctx_text": 2}, id="shallow-2-words"),
        Case({"ctx_init": "", "n_ctx_text": 3, "n_ctx_vision": 2, "prompt_depth_text": 2}, id="random-ctx"),
    ]
