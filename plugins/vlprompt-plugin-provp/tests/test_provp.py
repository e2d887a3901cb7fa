"""ProVP-Ref's mathematics on a tiny random ViT, its recipe, and the method contract."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from vlprompt_core.api import Batch, ClassSet
from vlprompt_core.errors import UserError
from vlprompt_core.testing import Case, MethodContract, random_images, make_world, tiny_backbone
from vlprompt_plugin_provp import ProVP, ProVPOptions

NAMES = ["red", "green", "apple pie", "blue"]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("provp"))


def build(bb, seed=0, **opts):
    torch.manual_seed(seed)
    return ProVP(bb, ClassSet(NAMES), ProVPOptions(**opts))


def test_zero_prompts_give_exactly_the_frozen_features(bb):
    m = build(bb, n_prompts=0)
    x = random_images(bb, 3)
    with torch.no_grad():
        assert torch.equal(m.image_features(x), bb.encode_image_tokens(bb.embed_image(x)))
        assert torch.allclose(m.image_features(x), bb.encode_image(x), atol=1e-6)


def test_prompts_are_inserted_after_the_class_token_and_mixed_before_later_blocks(bb):
    m = build(bb, n_prompts=3, alpha=0.25)
    x = random_images(bb, 2)
    seen = {}

    def spy(block, tokens):
        seen[block] = tokens.clone()
        return m.block_hook(block, tokens)

    with torch.no_grad():
        tokens = bb.embed_image(x)
        inserted = torch.cat([tokens[:, :1], m.prompts[0].expand(2, -1, -1), tokens[:, 1:]], 1)
        out = bb.encode_image_tokens(inserted, block_hook=spy)
        assert torch.allclose(out, m.image_features(x), atol=1e-6)
    n_patches = tokens.shape[1] - 1
    # block 0 sees [CLS, P_0 (3), patches]: prompts after the pre-norm, no positions added
    assert seen[0].shape == (2, 1 + 3 + n_patches, bb.vision_width)
    assert torch.equal(seen[0][:, 1:4], m.prompts[0].expand(2, -1, -1))
    assert torch.equal(seen[0][:, 4:], tokens[:, 1:])
    # before block 1, the hook mixes: 0.25 * (block 0's output at the slots) + 0.75 * P_1
    mixed = m.block_hook(1, seen[1])
    expected = 0.25 * seen[1][:, 1:4] + 0.75 * m.prompts[1]
    assert torch.allclose(mixed[:, 1:4], expected, atol=1e-7)
    assert torch.equal(mixed[:, :1], seen[1][:, :1]) and torch.equal(mixed[:, 4:], seen[1][:, 4:])


def test_alpha_one_carries_the_previous_outputs_unchanged(bb):
    m = build(bb, n_prompts=4, alpha=1.0)
    tokens = torch.randn(2, 9, bb.vision_width)
    for block in range(1, bb.vision_depth):
        assert torch.equal(m.block_hook(block, tokens), tokens)
    # so only P_0 matters: later prompts are ignored entirely
    x = random_images(bb, 3)
    with torch.no_grad():
        before = m.image_features(x)
        m.prompts[1:] += 1.0
        assert torch.equal(m.image_features(x), before)


def test_few_prompts_are_inserted_too(bb):
    """The official code inserts nothing for N <= 4 and then overwrites patch tokens; here
    the sequence grows by N for every N."""
    for n in (1, 4, 5):
        m = build(bb, n_prompts=n)
        lengths = []
        with torch.no_grad():
            x = bb.embed_image(random_images(bb, 1))
            x = torch.cat([x[:, :1], m.prompts[0][None], x[:, 1:]], 1)
            bb.encode_image_tokens(x, block_hook=lambda b, t: lengths.append(t.shape[1]) or m.block_hook(b, t))
        assert lengths == [1 + n + (bb.image_size // 8) ** 2] * bb.vision_depth


def test_reformation_loss_is_the_hand_computed_infonce(bb):
    m = build(bb, n_prompts=3, ref_weight=0.7, ref_temperature=0.5)
    m.train()
    x = random_images(bb, 3)
    frozen = bb.encode_image(x).detach()
    out = m(Batch(images=x, image_features=frozen, labels=torch.tensor([0, 1, 2])))
    with torch.no_grad():
        p = m.image_features(x)
        p = p / p.norm(dim=-1, keepdim=True)
        c = frozen / frozen.norm(dim=-1, keepdim=True)
        sim = (p @ c.T) / 0.5
        # -mean_i log( exp(sim_ii) / sum_j exp(sim_ij) )
        expected = -torch.stack([sim[i, i] - torch.logsumexp(sim[i], 0) for i in range(3)]).mean()
    assert out.losses["reformation"].item() == pytest.approx(0.7 * expected.item(), rel=1e-5)
    total = m.loss(out, Batch(labels=torch.tensor([0, 1, 2])))
    assert total.item() == pytest.approx(F.cross_entropy(out.logits, torch.tensor([0, 1, 2])).item()
                                         + 0.7 * expected.item(), rel=1e-5)
    m.eval()
    assert m(Batch(images=x, image_features=frozen)).losses == {}  # training only
    assert build(bb, ref_weight=0.0).train()(Batch(images=x, image_features=frozen)).losses == {}


def test_classifier_is_the_frozen_template_feature(bb):
    m = build(bb, templates=["a type of pet, a photo of a {}."])
    with torch.no_grad():
        ref = bb.encode_text(bb.tokenize([f"a type of pet, a photo of a {n}." for n in NAMES]))
    assert torch.allclose(m.text_features, ref / ref.norm(dim=-1, keepdim=True), atol=1e-6)
    assert not m.text_features.requires_grad


def test_initialisation_bound_and_shape(bb):
    m = build(bb, n_prompts=50)
    assert m.prompts.shape == (bb.vision_depth, 50, bb.vision_width)
    bound = (6 / (3 * 14 * 14 + bb.vision_width)) ** 0.5
    assert m.prompts.abs().max() <= bound and m.prompts.abs().max() > 0.9 * bound
    assert build(bb, prompt_depth=1).prompts.shape[0] == 1
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["prompts"]


def test_recipe_by_protocol_and_dataset():
    from vlprompt_plugin_provp import RECIPE

    def resolve(**ctx):
        return RECIPE.for_context(ctx)

    train, options = resolve(protocol="base2novel", shots=16, dataset="oxford_pets")
    assert (train["epochs"], train["weight_decay"], train["lr"]) == (100, 1e-3, 0.1)
    assert options == {"n_prompts": 16, "ref_weight": 1.0, "templates": ["a type of pet, a photo of a {}."]}
    train, options = resolve(protocol="few_shot", shots=1, dataset="eurosat")
    assert train["epochs"] == 50 and options == {"n_prompts": 50, "ref_weight": 0.0}
    train, options = resolve(protocol="few_shot", shots=16, dataset="dtd")
    assert train["epochs"] == 200 and options["ref_weight"] == 1.0 and options["templates"] == ["a texture of {}."]


def test_a_resnet_backbone_is_one_clear_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import vlprompt_core.plugins as plugins
    from vlprompt_core.cli import app

    world = make_world(tmp_path)
    cfg = tmp_path / "tiny_rn.json"
    cfg.write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "backbone": {"name": "open_clip", "model": str(cfg), "pretrained": None},
        "method": {"name": "provp"}, "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 1}, "train": {"epochs": 1, "seeds": [1]},
        "output": str(tmp_path / "out"),
    }))
    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
    monkeypatch.setattr(plugins, "_REGISTRY", None)  # the plug-ins as `vlprompt run` finds them, toy datasets too
    result = CliRunner().invoke(app, ["run", str(spec)], prog_name="vlprompt")
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {spec}: method 'provp' (provp) needs a ViT image tower (visual prompts go into its "
                      "blocks); backbone tiny_rn has none"]  # told by validate, before anything loads
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="needs a ViT"):
        from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip

        ProVP(build_open_clip(OpenClipOptions(model=str(cfg), pretrained=None)), ClassSet(NAMES), ProVPOptions())


class TestProVPContract(MethodContract):
    method = "provp"
    cases = [Case({"n_prompts": 3}), Case({"n_prompts": 2, "alpha": 0.5, "prompt_depth": 1, "ref_weight": 0.0})]
