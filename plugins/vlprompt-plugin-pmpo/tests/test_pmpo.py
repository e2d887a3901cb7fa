"""PMPO (reconstruction): the partition, the coupling, the combination rules, the prior,
the single-prompt reduction, the method contract, and the wheel users install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import Batch, ClassSet
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import PromptTable, PromptTemplate
from vlprompt_core.testing import Case, MethodContract, random_images, tiny_backbone
from vlprompt_kernels import cosine_logits
from vlprompt_plugin_pmpo import PMPO, PMPOOptions, equal_groups

NAMES = ["red", "green", "apple pie", "blue"]
PLUGIN = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("pmpo"))  # 2 image blocks


def build(bb, seed=0, **opts):
    torch.manual_seed(seed)
    m = PMPO(bb, ClassSet(NAMES), PMPOOptions(**{"n_prompts": 2, **opts}))
    with torch.no_grad():  # couplings far from their init scale, so visual tokens matter
        for f in m.couplings:
            f.weight.normal_(0, 0.5)
    return m


def test_equal_contiguous_groups():
    assert equal_groups(12, 4) == [0, 3, 6, 9]
    assert equal_groups(12, 5) == [0, 3, 6, 8, 10]
    assert equal_groups(4, 4) == [0, 1, 2, 3]
    assert equal_groups(9, 1) == [0]
    with pytest.raises(UserError, match="at least 3 prompted image blocks"):
        equal_groups(2, 3)


def test_group_starts_are_validated():
    with pytest.raises(ValueError, match="group_starts"):
        PMPOOptions(n_prompts=2, group_starts=[1, 2])
    with pytest.raises(ValueError, match="group_starts"):
        PMPOOptions(n_prompts=2, group_starts=[0])
    PMPOOptions(n_prompts=2, group_starts=[0, 1])


def test_single_prompt_single_group_is_a_maple_like_coupled_prompt(bb):
    """n_prompts 1, one group, insertion at the group start, no prior: exactly a
    MaPLe-like single coupled prompt of depth 1 — text: [SOS] P {class} . [EOS];
    image: the tokens F(P) appended after the patches *before* the pre-norm, nothing
    replaced later; logits = s * cos(f, t)."""
    m = build(bb, n_prompts=1, insertion="group_start", prior="none")
    x = random_images(bb, 3)
    with torch.no_grad():
        ctx, f_map = m.ctx[0], m.couplings[0]
        text = PromptTable(bb, NAMES, PromptTemplate.with_context(2)).encode(bb, ctx)
        tokens = bb.embed_image(x, pre_norm=False)
        tokens = torch.cat([tokens, f_map(ctx).expand(3, -1, -1)], 1)
        image = bb.encode_image_tokens(bb.vision_pre_norm(tokens))
        expected = cosine_logits(F.normalize(image, dim=-1), text, bb.logit_scale)
        m.eval()
        assert torch.allclose(m(Batch(images=x)).logits, expected, atol=1e-5)


def test_every_block_writes_the_groups_tokens_before_each_of_its_blocks(bb):
    m = build(bb, n_prompts=2, insertion="every_block")
    seen = {}
    original = bb.encode_image_tokens

    def spy(tokens, block_hook=None):
        def hook(b, t):
            out = block_hook(b, t)
            seen[b] = out[:, -2:].clone()
            return out
        return original(tokens, block_hook=hook)

    bb.encode_image_tokens = spy
    try:
        with torch.no_grad():
            m.image_features(random_images(bb, 2))
            visual = m.visual_prompts()
    finally:
        del bb.encode_image_tokens
    assert m.group_starts == [0, 1]
    # block 0: group 0's tokens, normalised with the rest; block 1: group 1's raw tokens
    assert torch.allclose(seen[0], bb.vision_pre_norm(visual[0]).expand(2, -1, -1), atol=1e-6)
    assert torch.equal(seen[1], visual[1].expand(2, -1, -1))


def test_group_start_leaves_later_blocks_of_a_group_alone(tmp_path):
    """Two prompts over a 4-block tower: groups [0, 1] and [2, 3]."""
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip
    from vlprompt_core.testing import TINY_CONFIG

    cfg = dict(TINY_CONFIG, vision_cfg=dict(TINY_CONFIG["vision_cfg"], layers=4))
    path = tmp_path / "tiny4.json"
    path.write_text(json.dumps(cfg))
    bb4 = build_open_clip(OpenClipOptions(model=str(path), pretrained=None))
    for insertion, replaced in (("group_start", [2]), ("every_block", [1, 2, 3])):
        m = build(bb4, n_prompts=2, insertion=insertion)
        assert m.group_starts == [0, 2] and m.group_of_block == [0, 0, 1, 1]
        visual = m.visual_prompts().detach()
        hook_inputs = {}
        original = bb4.encode_image_tokens

        def spy(tokens, block_hook=None):
            def hook(b, t):
                out = block_hook(b, t)
                hook_inputs[b] = (t[:, -2:].clone(), out[:, -2:].clone())
                return out
            return original(tokens, block_hook=hook)

        bb4.encode_image_tokens = spy
        try:
            with torch.no_grad():
                m.image_features(random_images(bb4, 1))
        finally:
            del bb4.encode_image_tokens
        for b in range(1, 4):
            before, after = hook_inputs[b]
            if b in replaced:
                assert torch.equal(after[0], visual[m.group_of_block[b]]), (insertion, b)
            else:
                assert torch.equal(after, before), (insertion, b)


def test_combination_rules_by_hand(bb):
    x = random_images(bb, 2)
    for combine in ("mean_logits", "mean_features", "mean_probs"):
        m = build(bb, combine=combine, prior="ensemble", prior_weight=0.4)
        m.eval()
        with torch.no_grad():
            f = F.normalize(m.image_features(x), dim=-1)
            t = F.normalize(m.text_features(), dim=-1)  # [2, C, D]
            prior = m.prior_features
            s = bb.logit_scale
            members = [t[0], t[1], prior]
            weights = [0.3, 0.3, 0.4]
            if combine == "mean_logits":
                expected = sum(w * s * f @ u.T for w, u in zip(weights, members))
            elif combine == "mean_features":
                mixed = sum(w * u for w, u in zip(weights, members))
                expected = s * f @ F.normalize(mixed, dim=-1).T
            else:
                expected = sum(w * (s * f @ u.T).softmax(-1) for w, u in zip(weights, members)).log()
            assert torch.allclose(m(Batch(images=x)).logits, expected, atol=1e-4), combine


def test_prior_consistency_loss(bb):
    m = build(bb, prior="loss", prior_loss_weight=3.0)
    m.train()
    out = m(Batch(images=random_images(bb, 2), labels=torch.tensor([0, 1])))
    with torch.no_grad():
        t = F.normalize(m.text_features(), dim=-1)
        expected = 3.0 * (1 - (t * m.prior_features[None]).sum(-1)).mean()
    assert out.losses["prior"].item() == pytest.approx(expected.item(), rel=1e-5)
    m.eval()
    assert m(Batch(images=random_images(bb, 2))).losses == {}
    # 'loss' alone leaves the prior out of the ensemble: scores are the prompts' mean
    with torch.no_grad():
        f = F.normalize(m.image_features(random_images(bb, 2)), dim=-1)
        expected = sum(0.5 * bb.logit_scale * f @ u.T for u in t)
        assert torch.allclose(m(Batch(images=random_images(bb, 2))).logits, expected, atol=1e-4)


def test_words_initialisation_keeps_the_rest_of_the_words(bb):
    m = build(bb, ctx_init="a photo of a", n_ctx=2)
    assert m.template.pieces[1:] == ("of a", "{}", ".")
    photo = bb.embed_tokens(torch.tensor(bb.tokenize_words("a photo"))).float()
    assert torch.equal(m.ctx.detach(), photo[None].repeat(2, 1, 1))
    with pytest.raises(UserError, match="whole words"):
        build(bb, ctx_init="photo", n_ctx=2)


def test_shared_coupling_and_parameters(bb):
    m = build(bb, coupling="shared", n_prompts=2)
    assert len(m.couplings) == 1
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"ctx", "couplings.0.weight", "couplings.0.bias"}
    assert len(build(bb, n_prompts=2).couplings) == 2


def test_text_features_once_per_evaluation(bb):
    m = build(bb)
    calls = []
    original = m.text_features
    m.text_features = lambda: calls.append(1) or original()
    m.eval()
    with torch.no_grad():
        m(Batch(images=random_images(bb, 2)))
        m(Batch(images=random_images(bb, 2, seed=1)))
    assert len(calls) == 1


def test_the_wheel_carries_what_users_read_first(tmp_path):
    """``pip wheel`` builds the distribution ``pip install vlprompt-plugin-pmpo`` installs: its
    metadata (description, licence, classifiers, the dependency on vlprompt, the README as
    the long description) and entry point. Installing it into a fresh environment beside
    vlprompt, where it then appears in ``vlprompt list``, is tests/test_plugin_wheels.py."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(PLUGIN)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("vlprompt_plugin_pmpo-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "vlprompt_plugin_pmpo/__init__.py" in names
    assert "Summary: PMPO (Tian et al., arXiv 2305.06221)" in meta
    assert "Requires-Dist: vlprompt>=0.1" in meta and "License-Expression: MIT" in meta
    assert "Classifier: Topic :: Scientific/Engineering :: Artificial Intelligence" in meta
    assert "**This is a reconstruction, not a port.**" in meta  # the README, first thing on the page
    assert "pmpo = vlprompt_plugin_pmpo" in entry_points


def test_a_resnet_backbone_is_one_clear_line(tmp_path):
    from vlprompt_core.engine import Engine
    from vlprompt_core.plugins import build_registry, make_plugin_manager
    from vlprompt_core.spec import validate_spec
    from vlprompt_core.testing import make_world

    world = make_world(tmp_path)
    cfg = tmp_path / "tiny_rn.json"
    cfg.write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
        reg = build_registry(*make_plugin_manager())
        spec = validate_spec({
            "backbone": {"name": "open_clip", "model": str(cfg), "pretrained": None},
            "method": {"name": "pmpo"}, "dataset": {"name": "toy", "root": str(world["data"])},
            "protocol": {"name": "few_shot", "shots": 1}, "train": {"epochs": 1, "seeds": [1]},
            "output": str(tmp_path / "out"),
        }, reg)
        with pytest.raises(UserError) as exc:
            Engine(spec, reg).run()
    assert exc.value.problems == ["method 'pmpo' (pmpo) needs a ViT image tower (visual prompts go into its "
                                  "blocks); backbone tiny_rn (ModifiedResNet image tower) has none"]


class TestPMPOContract(MethodContract):
    method = "pmpo"
    cases = [Case({"n_prompts": 2}),
             Case({"n_prompts": 1, "insertion": "group_start", "coupling": "shared", "combine": "mean_probs",
                   "prior": "both", "ctx_init": "a photo of a"}),
             Case({"n_prompts": 2, "combine": "mean_features", "prior": "none"})]
