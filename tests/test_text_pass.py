"""The text pass of learned prompts: the shared-prefix pass and chunking give the
features and gradients of the plain full pass (every prompt, every token, one pass)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlprompt_core import prompting
from vlprompt_core.prompting import (
    Context,
    PromptTable,
    PromptTemplate,
    current_text_chunking,
    rows_per_pass,
    text_chunking,
)

#: Class names of 1 to 5 BPE tokens, so the prompts end at different positions.
NAMES = ["red", "apple pie", "blue whale shark", "x", "golden retriever dog", "sea", "dark green sea turtle"]
N_CTX = 6


@pytest.fixture(scope="module")
def bb(world):
    from vlprompt_core.testing import tiny_backbone

    return tiny_backbone(world["root"])


@pytest.fixture()
def calls(bb, monkeypatch):
    """How often the shared-prefix pass ran since the test began: prefix passes and suffix passes."""
    counts = {"prefix": 0, "suffix": 0}
    encode_prefix, encode_suffix = bb.encode_text_prefix, bb.encode_text_suffix

    def prefix(*args, **kwargs):
        counts["prefix"] += 1
        return encode_prefix(*args, **kwargs)

    def suffix(*args, **kwargs):
        counts["suffix"] += 1
        return encode_suffix(*args, **kwargs)

    monkeypatch.setattr(bb, "encode_text_prefix", prefix)
    monkeypatch.setattr(bb, "encode_text_suffix", suffix)
    return counts


def full_pass(bb, table: PromptTable, ctx: torch.Tensor) -> torch.Tensor:
    """The reference: every prompt assembled and run whole, in one pass."""
    prompts = table.assemble(bb, ctx)
    *lead, length, width = prompts.shape
    ids = table.token_ids.expand(*prompts.shape[:-1]).reshape(-1, length)
    feats = bb.encode_text_embeddings(prompts.reshape(-1, length, width), ids, add_positional=False)
    return feats.reshape(*lead, -1)


def features_and_grad(encode, ctx: torch.Tensor, seed: int = 1):
    """Features of ``encode(ctx)`` and the gradient of a fixed random loss w.r.t. ``ctx``."""
    ctx = ctx.detach().clone().requires_grad_(True)
    feats = encode(ctx)
    weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(seed))
    (feats * weights).sum().backward()
    return feats.detach(), ctx.grad


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5):
    assert got.shape == want.shape
    scale = want.abs().max().clamp(min=1e-12)
    assert (got - want).abs().max() <= rel * scale, float((got - want).abs().max() / scale)


def random_ctx(*shape, width, seed=0):
    return torch.randn(*shape, width, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_prefix_length_is_what_every_prompt_shares(bb):
    assert bb.text_prefix_sharing
    assert PromptTable(bb, NAMES, PromptTemplate.with_context(16)).prefix_length == 17  # start token + context
    assert PromptTable(bb, NAMES, PromptTemplate.with_context(16, "middle")).prefix_length == 9
    assert PromptTable(bb, NAMES, PromptTemplate.with_context(16, "front")).prefix_length == 1
    # one class: everything but the pooled end token is shared
    one = PromptTable(bb, ["apple pie"], PromptTemplate.with_context(4))
    assert one.prefix_length == one.token_ids.shape[1] - 1
    # "apple pie" and "apple tree" share "apple" too
    assert PromptTable(bb, ["apple pie", "apple tree"], PromptTemplate.with_context(4)).prefix_length == 6


@pytest.mark.parametrize("position", ["end", "middle"])
@pytest.mark.parametrize("lead", [(), (3, 1), (2, 3, 1)], ids=["shared", "per-image", "samples-per-image"])
def test_shared_prefix_pass_equals_the_full_pass(bb, calls, position, lead):
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(N_CTX, position))
    assert table.prefix_length >= 2
    ctx = random_ctx(*lead, N_CTX, width=bb.text_width)
    want_f, want_g = features_and_grad(lambda c: full_pass(bb, table, c), ctx)
    assert calls == {"prefix": 0, "suffix": 0}
    with text_chunking(0):
        got_f, got_g = features_and_grad(lambda c: table.encode(bb, c), ctx)
    assert calls == {"prefix": 1, "suffix": 1}
    assert got_f.shape == (*lead[:-1], len(NAMES), bb.embed_dim)
    assert_close(got_f, want_f)
    assert_close(got_g, want_g)
    assert want_g.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_gradients_reach_what_the_context_is_made_from(bb, calls):
    """CoCoOp-style: per-image context = learned context + a shift from an image feature."""
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(N_CTX))
    base0, shift0 = random_ctx(N_CTX, width=bb.text_width), random_ctx(3, width=bb.text_width, seed=1)
    weights = torch.randn(3, len(NAMES), bb.embed_dim)

    def grads(encode):
        base, shift = base0.clone().requires_grad_(True), shift0.clone().requires_grad_(True)
        (encode((base[None] + shift[:, None])[:, None]) * weights).sum().backward()
        return base.grad, shift.grad

    want = grads(lambda c: full_pass(bb, table, c))
    got = grads(lambda c: table.encode(bb, c, chunk_size=4))
    assert calls["prefix"] == 1
    for g, w in zip(got, want):
        assert_close(g, w)


def test_embedded_clip_coop_prompts():
    """The pretrained embedded CLIP (sharper attention than random weights), CoOp's 16 vectors."""
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip

    bb = build_open_clip(OpenClipOptions())
    assert bb.text_prefix_sharing
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(16))
    ctx = bb.embed_tokens(torch.tensor(bb.tokenize_words("a photo of a"))).float().repeat(4, 1)
    want_f, want_g = features_and_grad(lambda c: full_pass(bb, table, c), ctx)
    got_f, got_g = features_and_grad(lambda c: table.encode(bb, c), ctx)
    assert_close(got_f, want_f)
    assert_close(got_g, want_g)


@pytest.mark.parametrize(
    "case",
    ["per-class context", "class name in front", "block hook", "backbone without prefix sharing"],
)
def test_full_pass_where_the_prefix_cannot_be_shared(bb, calls, monkeypatch, case):
    template = PromptTemplate.with_context(N_CTX, "front" if case == "class name in front" else "end")
    if case == "backbone without prefix sharing":
        monkeypatch.setattr(bb, "text_prefix_sharing", False)
    table = PromptTable(bb, NAMES, template)
    lead = (len(NAMES),) if case == "per-class context" else (2, 1)
    ctx = random_ctx(*lead, N_CTX, width=bb.text_width)
    seen = []

    def hook(i, x):
        seen.append(i)
        return x

    block_hook = hook if case == "block hook" else None
    got_f, got_g = features_and_grad(lambda c: table.encode(bb, c, block_hook=block_hook), ctx)
    want_f, want_g = features_and_grad(lambda c: full_pass(bb, table, c), ctx)
    assert calls == {"prefix": 0, "suffix": 0}
    assert seen == (list(range(bb.text_depth)) if block_hook else [])
    assert_close(got_f, want_f)
    assert_close(got_g, want_g)


@pytest.mark.parametrize("chunk", [1, 2, 5, 14, "auto"])
@pytest.mark.parametrize("lead", [(), (3, 1), (len(NAMES),)], ids=["shared", "per-image", "per-class"])
def test_chunks_give_the_features_and_gradients_of_one_pass(bb, calls, monkeypatch, chunk, lead):
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(N_CTX))
    ctx = random_ctx(*lead, N_CTX, width=bb.text_width)
    with text_chunking(0):
        want_f, want_g = features_and_grad(lambda c: table.encode(bb, c), ctx)
    shared = lead != (len(NAMES),)
    tokens = table.token_ids.shape[1] - (table.prefix_length if shared else 0)
    if chunk == "auto":  # a budget of 3 prompts per pass
        per_row = tokens * bb.text_width * 4 * prompting.ACTIVATION_VECTORS_PER_TOKEN * bb.text_depth
        monkeypatch.setattr(prompting.chunking, "AUTO_CHUNK_BUDGET", 3 * per_row + 1)
        assert rows_per_pass(bb, tokens, "auto") == 3
    rows = 3 if chunk == "auto" else chunk
    calls["suffix"] = 0
    with text_chunking(chunk):
        feats = table.encode(bb, ctx.requires_grad_(True))
        if shared:  # forward passes over the suffixes: whole groups, or some classes of one group
            groups, n_cls = (lead[0] if lead else 1), len(NAMES)
            expected = -(-groups // (rows // n_cls)) if rows >= n_cls else groups * -(-n_cls // rows)
            assert calls["suffix"] == expected
        got_f, got_g = features_and_grad(lambda c: table.encode(bb, c), ctx)
    assert_close(got_f, want_f)
    assert_close(got_g, want_g)
    assert feats.shape == want_f.shape


def test_an_explicit_chunk_size_wins_over_the_setting(bb, calls):
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(N_CTX))
    ctx = random_ctx(N_CTX, width=bb.text_width)
    with torch.no_grad(), text_chunking(0):
        table.encode(bb, ctx, chunk_size=2)
        assert calls["suffix"] == 4
        table.encode(bb, ctx)
        assert calls["suffix"] == 5


def test_text_chunking_sets_and_restores_the_setting():
    assert current_text_chunking() == "auto"
    with text_chunking(8):
        assert current_text_chunking() == 8
        with text_chunking(0):
            assert current_text_chunking() == 0
        assert current_text_chunking() == 8
        with pytest.raises(RuntimeError), text_chunking("auto"):
            assert current_text_chunking() == "auto"
            raise RuntimeError
        assert current_text_chunking() == 8
    assert current_text_chunking() == "auto"
    for bad in (-1, 2.5, "big", True, None):
        with pytest.raises(ValueError, match="text chunking"), text_chunking(bad):
            pass


def test_rows_per_pass(bb):
    assert rows_per_pass(bb, 10, 0) is None
    assert rows_per_pass(bb, 10, 7) == 7
    with text_chunking(5):
        assert rows_per_pass(bb, 10) == 5
    per_token = bb.text_width * 4 * prompting.ACTIVATION_VECTORS_PER_TOKEN
    assert rows_per_pass(bb, 10, "auto") == prompting.AUTO_CHUNK_BUDGET // (10 * per_token * bb.text_depth)
    # a longer prompt: fewer rows; no gradients: activations of one block, more rows
    assert rows_per_pass(bb, 30, "auto") < rows_per_pass(bb, 10, "auto")
    assert rows_per_pass(bb, 10, "auto", grad=False) > rows_per_pass(bb, 10, "auto")
    with torch.no_grad():
        assert rows_per_pass(bb, 10, "auto") == rows_per_pass(bb, 10, "auto", grad=False)
    assert rows_per_pass(bb, 10**12, "auto") == 1


def test_auto_chunks_a_longer_prompt_more(bb, calls, monkeypatch):
    """With the same budget, 16 context vectors (longer prompts) take more passes than 2."""
    short = PromptTable(bb, NAMES, PromptTemplate.with_context(2, "front"))
    long = PromptTable(bb, NAMES, PromptTemplate.with_context(16, "front"))
    per_token = bb.text_width * 4 * prompting.ACTIVATION_VECTORS_PER_TOKEN * bb.text_depth
    monkeypatch.setattr(prompting.chunking, "AUTO_CHUNK_BUDGET", 20 * per_token * short.token_ids.shape[1])
    encode, passes = bb.encode_text_embeddings, []

    def counting(*args, **kwargs):
        passes[-1] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(bb, "encode_text_embeddings", counting)
    for table, n_ctx in ((short, 2), (long, 16)):
        passes.append(0)
        table.encode(bb, random_ctx(3, 1, n_ctx, width=bb.text_width).requires_grad_(True))
    assert passes == [2, 3]


@settings(max_examples=25, deadline=None)
@given(
    n_cls=st.integers(1, 9),
    n_ctx=st.integers(1, 8),
    position=st.sampled_from(["end", "middle", "front"]),
    lead=st.sampled_from(["shared", "shared-1", "per-image", "samples", "per-class"]),
    chunk=st.sampled_from([0, 1, 2, 3, 5, 11, "auto"]),
    seed=st.integers(0, 2**16),
)
def test_any_table_and_layout_matches_the_full_pass(bb, n_cls, n_ctx, position, lead, chunk, seed):
    pool = NAMES + ["ball", "tiny red car", "a b c d"]
    names = [pool[(seed + 3 * i) % len(pool)] for i in range(n_cls)]  # distinct: 3 and 10 are coprime
    table = PromptTable(bb, names, PromptTemplate.with_context(n_ctx, position))
    shape = {"shared": (), "shared-1": (1,), "per-image": (2, 1), "samples": (2, 2, 1), "per-class": (n_cls,)}[lead]
    ctx = random_ctx(*shape, n_ctx, width=bb.text_width, seed=seed)
    want_f, want_g = features_and_grad(lambda c: full_pass(bb, table, c), ctx, seed)
    with text_chunking(chunk):
        got_f, got_g = features_and_grad(lambda c: table.encode(bb, c), ctx, seed)
    assert_close(got_f, want_f)
    assert_close(got_g, want_g)


# ------------------------------------------------------------- hooks with a context


@pytest.fixture(scope="module")
def deep_bb(tmp_path_factory):
    """A tiny backbone with 4 text blocks (deep prompts before blocks 1, 2, 3)."""
    import json

    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip
    from vlprompt_core.testing import TINY_CONFIG

    config = json.loads(json.dumps(TINY_CONFIG))
    config["text_cfg"]["layers"] = 4
    path = tmp_path_factory.mktemp("deep") / "tiny_deep.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(0)
    return build_open_clip(OpenClipOptions(model=str(path), pretrained=None))


def by_position(deep: list[torch.Tensor], n_ctx: int):
    """The reference deep-prompt hook, as the official code writes it: before block l >= 1
    the states at positions 1 .. n_ctx become deep[l - 1] (context right after the start token)."""

    def hook(layer, x):
        if not 1 <= layer <= len(deep):
            return x
        return torch.cat([x[:, :1], deep[layer - 1].expand(x.shape[0], -1, -1), x[:, 1 + n_ctx :]], dim=1)

    return hook


def deep_prompts_of(bb, n_ctx, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n_ctx, bb.text_width, generator=g) * 0.5).requires_grad_(True)
            for _ in range(bb.text_depth - 1)]


def grads_of(encode, ctx0, deep0, seed=1):
    """Features of ``encode(ctx, deep)`` and the gradients of a fixed random loss w.r.t. ``ctx`` and ``deep``."""
    ctx = ctx0.detach().clone().requires_grad_(True)
    deep = [d.detach().clone().requires_grad_(True) for d in deep0]
    feats = encode(ctx, deep)
    (feats * torch.randn(feats.shape, generator=torch.Generator().manual_seed(seed))).sum().backward()
    return feats.detach(), [ctx.grad, *(d.grad for d in deep)]


@pytest.mark.parametrize("chunk", [0, 1, 3, "auto"])
@pytest.mark.parametrize("lead", [(), (3, 1)], ids=["shared", "per-image"])
def test_deep_text_prompts_keep_the_shared_prefix_pass(deep_bb, monkeypatch, chunk, lead):
    """MaPLe's layout: a slots-only context hook runs on the shared prefix once per group and
    gives the features and gradients of the plain full pass with a position-writing hook."""
    from vlprompt_core.prompting import leading_words, text_prompt_hook

    bb = deep_bb
    template, _ = leading_words(bb, "a photo of a", 2)
    table = PromptTable(bb, NAMES, template)
    assert table.slots_in_prefix and table.prefix_length == 5  # [SOS] ctx ctx of a
    ctx, deep = random_ctx(*lead, 2, width=bb.text_width), deep_prompts_of(bb, 2)

    def full(c, d):
        prompts = table.assemble(bb, c)
        *rows, length, width = prompts.shape
        ids = table.token_ids.expand(*prompts.shape[:-1]).reshape(-1, length)
        feats = bb.encode_text_embeddings(prompts.reshape(-1, length, width), ids, block_hook=by_position(d, 2),
                                          add_positional=False)
        return feats.reshape(*rows, -1)

    want_f, want_g = grads_of(full, ctx, deep)
    counts = {"prefix": 0, "full": 0}
    prefix_pass, full_pass_ = bb.encode_text_prefix, bb.encode_text_embeddings
    monkeypatch.setattr(bb, "encode_text_prefix", lambda *a, **k: counts.__setitem__("prefix", counts["prefix"] + 1)
                        or prefix_pass(*a, **k))
    monkeypatch.setattr(bb, "encode_text_embeddings", lambda *a, **k: counts.__setitem__("full", counts["full"] + 1)
                        or full_pass_(*a, **k))
    if chunk == "auto":  # a budget of 2 suffixes per pass
        per_row = 3 * bb.text_width * 4 * prompting.ACTIVATION_VECTORS_PER_TOKEN * bb.text_depth
        monkeypatch.setattr(prompting.chunking, "AUTO_CHUNK_BUDGET", 10 * per_row)
    with text_chunking(chunk):
        got_f, got_g = grads_of(lambda c, d: table.encode(bb, c, block_hook=text_prompt_hook(d)), ctx, deep)
    assert counts == {"prefix": 1, "full": 0}
    assert_close(got_f, want_f)
    for got, want in zip(got_g, want_g):
        assert want.abs().sum() > 0
        assert_close(got, want)
    # and the deep prompts matter: without them the features differ
    with torch.no_grad():
        assert not torch.allclose(table.encode(bb, ctx), want_f, atol=1e-3)


def test_the_context_says_which_rows_and_slots(deep_bb):
    from vlprompt_core.api import ContextHook

    bb = deep_bb
    table = PromptTable(bb, NAMES, PromptTemplate(Context(0, 2), "of a", "{}", "."))
    seen = []

    def record(layer, x, context):
        if layer == 0:
            seen.append((x.shape, context))
        return x

    ctx = random_ctx(2, 1, 2, width=bb.text_width)
    with torch.no_grad(), text_chunking(3):
        table.encode(bb, ctx, block_hook=ContextHook(record))  # not slots-only: the whole pass, chunked
    assert [s[0][0] for s in seen] == [3, 3, 3, 3, 2]  # 2 groups x 7 classes in chunks of 3
    classes = torch.cat([c.classes for _, c in seen])
    groups = torch.cat([c.groups for _, c in seen])
    assert classes.tolist() == list(range(len(NAMES))) * 2
    assert groups.tolist() == [0] * len(NAMES) + [1] * len(NAMES)
    for shape, c in seen:
        assert c.tower == "text" and c.part == "whole"
        assert c.slots.shape == shape[:2]  # cut to the length the hook sees
        assert torch.equal(c.slots, table.slots[c.classes, : shape[1]])
        assert (c.slots[:, 1:3] == torch.tensor([0, 1])).all() and (c.slots[:, 3:] == -1).all()

    seen.clear()
    with torch.no_grad():
        table.encode(bb, ctx, block_hook=ContextHook(record, slots_only=True))
    [(shape, c)] = seen
    assert c.part == "prefix" and c.classes is None and c.groups.tolist() == [0, 1]
    assert shape == (2, table.prefix_length, bb.text_width)
    assert c.slots.tolist() == [[-1, 0, 1, -1, -1]] * 2

    seen.clear()
    x = bb.embed_image(torch.randn(3, 3, 16, 16))
    with torch.no_grad():
        bb.encode_image_tokens(x, block_hook=ContextHook(record))
    [(shape, c)] = seen
    assert c.tower == "image" and c.groups.tolist() == [0, 1, 2] and c.slots is None and c.classes is None


def test_slots_only_hook_runs_whole_prompts_when_the_slots_are_not_all_shared(deep_bb, calls):
    """Class name in front: the context follows it, the prefix is the start token alone."""
    from vlprompt_core.prompting import text_prompt_hook

    bb = deep_bb
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(2, "middle"))  # ctx0 {} ctx1 .
    assert not table.slots_in_prefix
    ctx, deep = random_ctx(2, width=bb.text_width), deep_prompts_of(bb, 2)

    def reference(layer, x):  # the slot positions differ per class here
        if not 1 <= layer <= len(deep):
            return x
        out = x.clone()
        rows, cols = torch.nonzero(table.slots[:, : x.shape[1]] >= 0, as_tuple=True)
        out[rows, cols] = deep[layer - 1][table.slots[rows, cols]]
        return out

    with torch.no_grad():
        got = table.encode(bb, ctx, block_hook=text_prompt_hook(deep))
        want = full_pass_with(bb, table, ctx, reference)
    assert calls == {"prefix": 0, "suffix": 0}
    assert_close(got, want)


def full_pass_with(bb, table, ctx, hook):
    prompts = table.assemble(bb, ctx)
    length, width = prompts.shape[-2:]
    return bb.encode_text_embeddings(prompts.reshape(-1, length, width), table.token_ids, block_hook=hook,
                                     add_positional=False)


def test_a_slots_only_hook_that_changes_other_tokens_is_a_contract_error(deep_bb):
    from vlprompt_core.api import ContextHook, ContractError

    bb = deep_bb
    table = PromptTable(bb, NAMES, PromptTemplate(Context(0, 2), "{}", "."))
    liar = ContextHook(lambda layer, x, context: x + 1.0 if layer == 1 else x, slots_only=True)
    with torch.no_grad(), pytest.raises(ContractError, match="slots_only but changed a token"):
        table.encode(bb, random_ctx(2, width=bb.text_width), block_hook=liar)
