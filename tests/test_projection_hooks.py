"""Projection hooks (``VisionLanguageBackbone.adapted``): every attention projection of both
towers passes through the hook in every path (whole text, shared-prefix text, image), the
hook's effect is the one of edited weights, gradients reach only the hook's tensors, and the
frozen weights and the hook-less paths stay bit-identical."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprompt_core.api import ContractError, ProjectionHook, ProjectionSite
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import PromptTable, PromptTemplate, text_chunking
from vlprompt_core.testing import edited_backbone, random_images

NAMES = ["red", "apple pie", "blue whale shark", "x"]
PROJECTIONS = ("q", "k", "v", "out")
N_CTX = 3


@pytest.fixture(scope="module")
def bb(world):
    from vlprompt_core.testing import tiny_backbone

    return tiny_backbone(world["root"])


def frozen_state(bb) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bb.state_dict().items()}


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5):
    assert got.shape == want.shape
    scale = want.abs().max().clamp(min=1e-12)
    assert (got - want).abs().max() <= rel * scale, float((got - want).abs().max() / scale)


def every_site(bb) -> set[ProjectionSite]:
    return {ProjectionSite(tower, layer, p)
            for tower, depth in (("text", bb.text_depth), ("image", bb.vision_depth))
            for layer in range(depth) for p in PROJECTIONS}


def towers(bb, ctx=None):
    """Text features of NAMES (whole prompts), image features, and the features of a
    CoOp-style context table through the shared-prefix pass and through the whole pass."""
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(N_CTX))
    ctx = torch.linspace(-0.1, 0.1, N_CTX * bb.text_width).view(N_CTX, bb.text_width) if ctx is None else ctx
    with text_chunking(0):
        shared = table.encode(bb, ctx)
    prompts = table.assemble(bb, ctx)
    whole = bb.encode_text_embeddings(prompts, table.token_ids.expand(len(NAMES), -1), add_positional=False)
    images = random_images(bb, 3, seed=1)
    return {
        "text": bb.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES])),
        "image": bb.encode_image(images),
        "image_tokens": bb.encode_image_tokens(bb.embed_image(images)),
        "prefix": shared,
        "whole": whole,
    }


def deltas(bb, sites, seed=0, scale=0.05) -> dict[ProjectionSite, torch.Tensor]:
    """A random weight change ``[out, in]`` per site."""
    g = torch.Generator().manual_seed(seed)
    width = {"text": bb.text_width, "image": bb.vision_width}
    return {s: scale * torch.randn(width[s.tower], width[s.tower], generator=g) for s in sorted(sites, key=str)}


def delta_hook(changes) -> ProjectionHook:
    """``y + x @ D.T``: what ``W + D`` makes of ``x``."""
    def hook(site, x, y):
        d = changes.get(site)
        return y if d is None else y + x @ d.T.to(x.dtype)
    return hook


def test_the_capability_and_the_site():
    site = ProjectionSite("text", 3, "v")
    assert (site.tower, site.layer, site.projection) == ("text", 3, "v")
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.layer = 4
    assert site == ProjectionSite("text", 3, "v") and len({site, ProjectionSite("text", 3, "v")}) == 1


def test_identity_hook_gives_the_plain_features(bb):
    """Every path, run by hand under an identity hook, equals the plain (fast) path."""
    assert "projection_hooks" in bb.capabilities
    with torch.no_grad():
        plain = towers(bb)
        with bb.adapted(lambda site, x, y: y):
            hooked = towers(bb)
    for name in plain:
        assert_close(hooked[name], plain[name])
    assert_close(plain["prefix"], plain["whole"])


def test_every_site_is_seen_once_per_pass(bb):
    seen: list[ProjectionSite] = []
    shapes: dict[ProjectionSite, tuple] = {}

    def hook(site, x, y):
        seen.append(site)
        shapes[site] = (x.shape[-1], y.shape[-1])
        return y

    with torch.no_grad(), bb.adapted(hook):
        bb.encode_text(bb.tokenize(["a photo of a red."]))
        text_sites = list(seen)
        bb.encode_image(random_images(bb, 2))
    assert len(seen) == len(set(seen)) == 4 * (bb.text_depth + bb.vision_depth)
    assert set(seen) == every_site(bb)
    assert {s.tower for s in text_sites} == {"text"}
    # per block: q, k, v in that order, then out
    assert [s.projection for s in text_sites[:4]] == ["q", "k", "v", "out"]
    assert all(shapes[s] == (bb.text_width,) * 2 for s in text_sites)

    seen.clear()
    with torch.no_grad(), bb.adapted(hook), text_chunking(0):
        PromptTable(bb, NAMES, PromptTemplate.with_context(N_CTX)).encode(bb, torch.zeros(N_CTX, bb.text_width))
    # the prefix pass and the suffix pass each visit every text site once
    assert sorted(map(str, seen)) == sorted(map(str, 2 * [s for s in every_site(bb) if s.tower == "text"]))


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("tower", ["text", "image"])
def test_a_hook_does_what_edited_weights_do(bb, tower, projection):
    """``y + x @ D.T`` at one projection of every block of a tower equals the backbone with
    that projection's weight ``W + D``, in every path."""
    depth = bb.text_depth if tower == "text" else bb.vision_depth
    changes = deltas(bb, {ProjectionSite(tower, layer, projection) for layer in range(depth)})
    with torch.no_grad():
        want = towers(edited_backbone(bb, changes))
        plain = towers(bb)
        with bb.adapted(delta_hook(changes)):
            got = towers(bb)
    for name in want:
        assert_close(got[name], want[name])
    moved = ["text", "prefix", "whole"] if tower == "text" else ["image", "image_tokens"]
    for name in moved:
        assert (got[name] - plain[name]).abs().max() > 1e-3 * plain[name].abs().max(), name


@settings(max_examples=8, deadline=None)
@given(st.sets(st.tuples(st.sampled_from(["text", "image"]), st.integers(0, 1), st.sampled_from(PROJECTIONS)),
               min_size=1), st.integers(0, 2**16))
def test_any_set_of_sites_does_what_edited_weights_do(bb, sites, seed):
    changes = deltas(bb, {ProjectionSite(*s) for s in sites}, seed=seed)
    with torch.no_grad():
        want = towers(edited_backbone(bb, changes))
        with bb.adapted(delta_hook(changes)):
            got = towers(bb)
    for name in want:
        assert_close(got[name], want[name])


def test_gradients_reach_only_the_hooks_tensors_and_the_weights_stay(bb):
    """LoRA-shaped tensors (A [r, in], B [out, r]) at every site: each gets a gradient, the
    frozen weights get none and stay bit-identical through an optimiser step; the shared-prefix
    pass gives the gradients of the whole pass."""
    before = frozen_state(bb)
    g = torch.Generator().manual_seed(0)
    width = {"text": bb.text_width, "image": bb.vision_width}
    lora = {s: (torch.randn(2, width[s.tower], generator=g).requires_grad_(),
                torch.randn(width[s.tower], 2, generator=g).mul(0.1).requires_grad_()) for s in every_site(bb)}

    def hook(site, x, y):
        a, b = lora[site]
        return y + (x @ a.T) @ b.T * 0.5

    def grads(which):
        for a, b in lora.values():
            a.grad = b.grad = None
        with bb.adapted(hook):
            feats = towers(bb)
        feats[which].square().sum().backward()
        return {s: (a.grad.clone(), b.grad.clone()) for s, (a, b) in lora.items() if a.grad is not None}

    for which in ("text", "image"):
        got = grads(which)
        assert set(got) == {s for s in every_site(bb) if s.tower == which}
        assert all(a.abs().sum() > 0 and b.abs().sum() > 0 for a, b in got.values())
    shared, whole = grads("prefix"), grads("whole")
    assert set(shared) == set(whole)
    for s in whole:
        assert_close(shared[s][0], whole[s][0])
        assert_close(shared[s][1], whole[s][1])
    assert all(p.grad is None for p in bb.parameters())
    assert not any(p.requires_grad for p in bb.parameters())

    opt = torch.optim.AdamW([t for pair in lora.values() for t in pair], lr=0.1, weight_decay=0.01)
    with bb.adapted(hook):
        loss = sum(f.square().sum() for f in towers(bb).values())
    loss.backward()
    opt.step()
    after = frozen_state(bb)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_without_a_hook_the_paths_are_bit_identical(bb):
    with torch.no_grad():
        plain = towers(bb)
        with bb.adapted(delta_hook(deltas(bb, every_site(bb)))):
            towers(bb)
        again = towers(bb)
    assert bb.projection_hook is None
    for name in plain:
        assert torch.equal(plain[name], again[name]), name
    # the plain image path is open_clip's own forward
    images = random_images(bb, 3, seed=1)
    with torch.no_grad():
        assert torch.equal(bb.encode_image(images), bb.visual(images))


def test_nesting_and_errors_restore_the_outer_hook(bb):
    def outer(site, x, y):
        return y

    def inner(site, x, y):
        return y

    with bb.adapted(outer):
        assert bb.projection_hook is outer
        with bb.adapted(inner):
            assert bb.projection_hook is inner
        assert bb.projection_hook is outer
        with pytest.raises(KeyError), bb.adapted(inner):
            raise KeyError("boom")
        assert bb.projection_hook is outer
    assert bb.projection_hook is None


def test_a_bad_hook_is_a_contract_error(bb):
    with pytest.raises(ContractError, match="callable"), bb.adapted("not a function"):
        pass
    with pytest.raises(ContractError, match="text block 0 q must return a tensor of the projection's shape"):
        with torch.no_grad(), bb.adapted(lambda site, x, y: y[..., :1]):
            bb.encode_text(bb.tokenize(["a red."]))
    with pytest.raises(ContractError, match="got NoneType"):
        with torch.no_grad(), bb.adapted(lambda site, x, y: None):
            bb.encode_image(random_images(bb, 1))
    assert bb.projection_hook is None


def test_a_backbone_without_the_capability_refuses_in_one_line(bb, monkeypatch):
    monkeypatch.setattr(bb, "capabilities", frozenset({"vision_transformer"}))
    with pytest.raises(UserError, match="backbone.adapted .* needs attention projections reachable"):
        with bb.adapted(lambda site, x, y: y):
            pass
