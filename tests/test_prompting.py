"""The shared prompt machinery: templates, prompt tables, chunked encoding, frozen class features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt_core.api import ClassSet
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import (
    ENSEMBLE_TEMPLATES,
    Context,
    PromptTable,
    PromptTemplate,
    class_text_features,
    init_context,
    templates_for,
)

NAMES = ["red", "apple pie", "blue"]


@pytest.fixture(scope="module")
def bb(world):
    from vlprompt_core.testing import tiny_backbone

    return tiny_backbone(world["root"])


def test_template_needs_the_class_name_once():
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate(Context(0, 2), ".")
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate("{}", "{}")
    with pytest.raises(ValueError, match="range"):
        Context(3, 1)


def test_layout_with_words_between_context_and_class(bb):
    """A MaPLe-style template: 2 learned words, then fixed words, then the class."""
    template = PromptTemplate(Context(0, 2), "of a", "{}", ".")
    ids, slots = template.layout(bb, "apple pie")
    x = bb.tokenize_words("X")[0]
    words = bb.tokenize_words("of a")
    name = bb.tokenize_words("apple pie")
    dot = bb.tokenize_words(".")
    assert ids == [bb.sot_id, x, x, *words, *name, *dot, bb.eot_id]
    assert slots == [-1, 0, 1] + [-1] * (len(words) + len(name) + len(dot)) + [-1]
    # the same ids as tokenising the whole placeholder prompt
    full = bb.tokenize(["X X of a apple pie."])[0]
    assert full[: len(ids)].tolist() == ids
    assert template.n_ctx == 2


def test_with_context_positions():
    assert PromptTemplate.with_context(4).pieces == (Context(0, 4), "{}", ".")
    assert PromptTemplate.with_context(4, "front").pieces == ("{}", Context(0, 4), ".")
    assert PromptTemplate.with_context(5, "middle").pieces == (Context(0, 2), "{}", Context(2, 5), ".")


def test_table_context_from_words_equals_the_hand_written_prompt(bb):
    """Writing the embeddings of 'a photo of a' into the slots gives CLIP's own features."""
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(4))
    ctx = init_context(bb, 4, "a photo of a")
    with torch.no_grad():
        ours = table.encode(bb, ctx)
        ref = bb.encode_text(bb.tokenize([f"a photo of a {n}." for n in NAMES]))
    assert ours.shape == (3, bb.embed_dim)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_table_leading_dims_equal_one_encode_per_context(bb):
    """Per-image context ``[B, 1, M, D]`` gives, for each image, the features of
    encoding that image's context alone."""
    torch.manual_seed(0)
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(3))
    ctx = torch.randn(4, 1, 3, bb.text_width) * 0.1
    with torch.no_grad():
        batched = table.encode(bb, ctx)
        one_by_one = torch.stack([table.encode(bb, ctx[i, 0]) for i in range(4)])
    assert batched.shape == (4, len(NAMES), bb.embed_dim)
    assert torch.allclose(batched, one_by_one, atol=1e-5, rtol=1e-4)
    # samples x images x classes: three leading dims
    ctx3 = torch.randn(2, 4, 1, 3, bb.text_width) * 0.1
    with torch.no_grad():
        out = table.encode(bb, ctx3)
    assert out.shape == (2, 4, len(NAMES), bb.embed_dim)
    with torch.no_grad():
        assert torch.allclose(out[1, 2], table.encode(bb, ctx3[1, 2, 0]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_encoding_gives_the_same_features_and_gradients(bb, chunk):
    torch.manual_seed(0)
    table = PromptTable(bb, NAMES, PromptTemplate.with_context(2))
    base = torch.randn(4, 1, 2, bb.text_width) * 0.1
    weights = torch.randn(4, len(NAMES), bb.embed_dim)

    def run(chunk_size):
        ctx = base.clone().requires_grad_(True)
        feats = table.encode(bb, ctx, chunk_size=chunk_size)
        (feats * weights).sum().backward()
        return feats.detach(), ctx.grad

    full_f, full_g = run(None)
    f, g = run(chunk)
    assert torch.allclose(f, full_f, atol=1e-5, rtol=1e-4)
    assert torch.allclose(g, full_g, atol=1e-5, rtol=1e-4)
    assert g.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_table_rejects_prompts_longer_than_the_context(bb):
    with pytest.raises(UserError, match=r"class '.*': its prompt .* is \d+ tokens, over the backbone's text context"):
        PromptTable(bb, NAMES, PromptTemplate.with_context(bb.context_length))


def test_init_context_words_and_random(bb):
    words = init_context(bb, 16, "a photo of a")
    assert words.shape == (4, bb.text_width)
    assert torch.equal(words, bb.embed_tokens(torch.tensor(bb.tokenize_words("a photo of a"))).float())
    torch.manual_seed(0)
    rand = init_context(bb, 16, std=0.02, per_class=5)
    assert rand.shape == (5, 16, bb.text_width) and rand.dtype == torch.float32
    assert abs(rand.std().item() - 0.02) < 0.002
    with pytest.raises(UserError, match="random"):
        init_context(bb, 4, "a photo of a", per_class=3)


def test_class_text_features_average_normalised_templates(bb):
    templates = ["a photo of a {}.", "itap of a {}."]
    got = class_text_features(bb, NAMES, templates)
    with torch.no_grad():
        a = F.normalize(bb.encode_text(bb.tokenize([templates[0].format(n) for n in NAMES])), dim=-1)
        b = F.normalize(bb.encode_text(bb.tokenize([templates[1].format(n) for n in NAMES])), dim=-1)
    expected = (a + b) / 2
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(NAMES)))


def test_templates_for_choices():
    classes = ClassSet(["x"], ["a photo of a {}, a type of pet."])
    assert templates_for("dataset", classes) == ["a photo of a {}, a type of pet."]
    assert templates_for("ensemble", classes) == ["a photo of a {}, a type of pet.", *ENSEMBLE_TEMPLATES]
    assert templates_for(["{} texture."], classes) == ["{} texture."]


# ------------------------------------------------- class names ending in punctuation

#: The ImageNet class names (CLIP's clean names, as in datasets_spec/imagenet.yaml) that end in
#: punctuation; the last is ImageNet-A's one. CLIP's BPE merges a run of punctuation, so in the
#: whole prompt "... kite (bird of prey)." the name ends in one ")." token.
PUNCTUATED = [
    "kite (bird of prey)",
    "Mexican hairless dog (xoloitzcuintli)",
    "ram (adult male sheep)",
    "impala (antelope)",
    "military hat (bearskin or shako)",
    "cherimoya (custard apple)",
]
#: Names with punctuation that does not end them (no merge with the ".").
INNER_PUNCTUATION = ["St. Bernard", "potter's wheel", "baluster / handrail", "apple pie"]


def test_punctuated_names_merge_with_the_period(bb):
    """The premise: tokenised with the '.', these names end in a different token."""
    for name in PUNCTUATED:
        alone, joined = bb.tokenize_words(name), bb.tokenize_words(name + ".")
        assert len(joined) == len(alone) and joined[:-1] == alone[:-1] and joined[-1] != alone[-1], name


@pytest.mark.parametrize(
    "template, text",
    [
        (PromptTemplate.with_context(4), "X X X X {}."),  # CoOp, CoCoOp, PRE, BPL
        (PromptTemplate(Context(0, 2), "of a", "{}", "."), "X X of a {}."),  # MaPLe-style (PMPO)
        (PromptTemplate("a photo of a", "{}", "."), "a photo of a {}."),  # no context
    ],
)
def test_layout_ids_equal_the_tokenised_whole_prompt(bb, template, text):
    """With the name before the '.', the ids are those of tokenising the whole prompt
    string, as the reference code (and CLIP's zero-shot) do."""
    for name in PUNCTUATED + INNER_PUNCTUATION:
        ids, slots = template.layout(bb, name)
        full = bb.tokenize([text.format(name)])[0]
        assert ids == full[: len(ids)].tolist(), name
        assert (full[len(ids):] == 0).all(), name
        x = bb.tokenize_words("X")[0]
        assert [i for i, s in zip(ids, slots) if s >= 0] == [x] * template.n_ctx


def _reference_layout(bb, name: str, n_ctx: int, position: str) -> tuple[list[int], list[int]]:
    """What the reference ``PromptLearner`` (CoOp, PRE) builds: it tokenises the whole
    ``end`` prompt ``"X X X X " + name + "."`` and, for ``middle``/``front``, cuts the
    class tokens out of what follows the context by the token count of the name alone."""
    x = bb.tokenize_words("X")[0]
    after = bb.tokenize_words(" ".join(["X"] * n_ctx) + " " + name + ".")[n_ctx:]
    k = len(bb.tokenize_words(name))
    cls, rest = after[:k], after[k:]
    if position == "end":
        ids, slots = [x] * n_ctx + after, list(range(n_ctx)) + [-1] * len(after)
    elif position == "front":
        ids, slots = cls + [x] * n_ctx + rest, [-1] * k + list(range(n_ctx)) + [-1] * len(rest)
    else:
        h = n_ctx // 2
        ids = [x] * h + cls + [x] * (n_ctx - h) + rest
        slots = list(range(h)) + [-1] * k + list(range(h, n_ctx)) + [-1] * len(rest)
    return [bb.sot_id, *ids, bb.eot_id], [-1, *slots, -1]


@pytest.mark.parametrize("position, n_ctx", [("end", 4), ("middle", 4), ("middle", 5), ("front", 3)])
def test_layout_equals_the_reference_prompt_learner(bb, position, n_ctx):
    """Every name at the end, and names that do not end in punctuation anywhere, are laid
    out as the reference lays them out."""
    template = PromptTemplate.with_context(n_ctx, position)
    names = PUNCTUATED + INNER_PUNCTUATION if position == "end" else INNER_PUNCTUATION
    for name in names:
        assert template.layout(bb, name) == _reference_layout(bb, name, n_ctx, position), name


def test_middle_and_front_keep_the_period_at_the_end(bb):
    """With context right after the name, a name that ends in punctuation is tokenised
    alone and the '.' stays before the end token, as for every other name. (The
    reference moves the merged ').' before the context and drops the '.': its bug,
    documented in the CoOp plug-in's README; this pins both sequences.)"""
    x, dot = bb.tokenize_words("X")[0], bb.tokenize_words(".")
    name = "kite (bird of prey)"
    alone, merged = bb.tokenize_words(name), bb.tokenize_words(name + ".")
    assert len(dot) == 1 and merged[-1] != alone[-1]
    ids, slots = PromptTemplate.with_context(4, "middle").layout(bb, name)
    assert ids == [bb.sot_id, x, x, *alone, x, x, *dot, bb.eot_id]
    assert slots == [-1, 0, 1] + [-1] * len(alone) + [2, 3, -1, -1]
    assert _reference_layout(bb, name, 4, "middle")[0] == [bb.sot_id, x, x, *merged, x, x, bb.eot_id]
    ids, _ = PromptTemplate.with_context(2, "front").layout(bb, name)
    assert ids == [bb.sot_id, *alone, x, x, *dot, bb.eot_id]
    ids, _ = PromptTemplate.with_context(2, "front").layout(bb, "St. Bernard")
    assert ids == [bb.sot_id, *bb.tokenize_words("St. Bernard"), x, x, *dot, bb.eot_id]


def test_context_from_words_equals_zero_shot_prompt_for_punctuated_names(bb):
    """CoOp with ctx_init 'a photo of a' builds zero-shot's 'a photo of a {}.' prompt:
    the same token sequence and the same features."""
    names = PUNCTUATED + ["apple pie"]
    table = PromptTable(bb, names, PromptTemplate.with_context(4))
    words = torch.tensor(bb.tokenize_words("a photo of a"))
    ids = torch.where(table.slots >= 0, words[table.slots.clamp(min=0)], table.token_ids)
    zero_shot = bb.tokenize([f"a photo of a {n}." for n in names])
    assert torch.equal(ids, zero_shot[:, : ids.shape[1]])
    ctx = init_context(bb, 4, "a photo of a")
    with torch.no_grad():
        ours = F.normalize(table.encode(bb, ctx), dim=-1)
    assert torch.allclose(ours, class_text_features(bb, names, ["a photo of a {}."]), atol=1e-5)


# ------------------------------------------------------------ leading words, deep prompts


def test_leading_words_learns_the_first_tokens_and_keeps_the_rest(bb):
    from vlprompt_core.prompting import leading_words

    template, ctx = leading_words(bb, "a photo of a", 2)
    assert template.pieces == (Context(0, 2), "of a", "{}", ".")
    assert torch.equal(ctx, bb.embed_tokens(torch.tensor(bb.tokenize_words("a photo"))).float())
    ids, slots = template.layout(bb, "apple pie")
    whole = bb.tokenize(["a photo of a apple pie."])[0]  # the official prompt, tokenised as one string
    x = bb.tokenize_words("X")[0]
    assert ids == [whole[0].item(), x, x, *whole[3 : len(ids)].tolist()]
    assert slots == [-1, 0, 1] + [-1] * (len(ids) - 3)
    every, _ = leading_words(bb, "a photo of a", 4)  # all of it learned: CoOp's "a photo of a" prompt
    assert every.pieces == (Context(0, 4), "{}", ".")


def test_leading_words_refuses_what_cannot_be_split(bb):
    from vlprompt_core.prompting import leading_words, leading_words_problem

    with pytest.raises(UserError, match="n_ctx 5 must be between 1 and the 4 tokens of ctx_init 'a photo of a'"):
        leading_words(bb, "a photo of a", 5)
    with pytest.raises(UserError, match="between 1 and the 0 tokens"):
        leading_words(bb, "", 2)
    # a word of several tokens cannot be cut: counts as a fake tokenizer gives them
    tokens = {"a": 1, "a photograph": 3, "a photograph of": 4}
    problem = leading_words_problem(lambda text: tokens[text], "a photograph of", 2)
    assert problem == ("n_ctx 2 ends inside the word 'photograph' of ctx_init 'a photograph of'; the first n_ctx "
                       "tokens must be whole words (word ends at 1, 3, 4 tokens)")
    assert leading_words_problem(lambda text: tokens[text], "a photograph of", 3) is None


def test_replace_slots_and_the_vision_hook():
    from vlprompt_core.prompting import append_prompts, prompt_depth, replace_slots, vision_prompt_hook

    x = torch.zeros(2, 5, 3)
    slots = torch.tensor([[-1, 0, 1, -1, -1], [-1, -1, 1, 0, -1]])
    prompt = torch.tensor([[1.0, 1, 1], [2, 2, 2]])
    out = replace_slots(x, slots, prompt)
    assert out[:, :, 0].tolist() == [[0, 1, 2, 0, 0], [0, 0, 2, 1, 0]]

    tokens = torch.zeros(2, 4, 3)
    first, deep = torch.ones(2, 3), [torch.full((2, 3), 7.0)]
    y = append_prompts(tokens, first)
    assert y.shape == (2, 6, 3) and y[:, 4:].eq(1).all() and y[:, :4].eq(0).all()
    hook = vision_prompt_hook(deep)
    assert hook(0, y) is y and hook(2, y) is y  # block 0 has the appended prompts; no prompts for block 2
    z = hook(1, y + 0.5)
    assert z.shape == y.shape and z[:, 4:].eq(7).all() and z[:, :4].eq(0.5).all()
    assert [prompt_depth(9, 12), prompt_depth(9, 4), prompt_depth(0, 4)] == [9, 4, 0]
