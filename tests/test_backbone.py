"""The open_clip backbone: attributes, text/vision paths, freezing, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlprompt_core.testing import TINY_CONFIG
from vlprompt_core.builtin.open_clip_backbone import OPENAI_MEAN, OPENAI_STD, OpenClipOptions, build_open_clip
from vlprompt_core.errors import UserError

TEXTS = ["a photo of a red.", "x", "a much longer prompt with quite a few more words in it than the others"]


@pytest.fixture(scope="module")
def bb(world):
    torch.manual_seed(0)
    return build_open_clip(OpenClipOptions(model=str(world["config"]), pretrained=None))


def images(n=2, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- attributes


def test_widths_and_depths_read_from_the_model(bb):
    assert bb.embed_dim == TINY_CONFIG["embed_dim"]
    assert bb.text_width == TINY_CONFIG["text_cfg"]["width"]
    assert bb.text_depth == TINY_CONFIG["text_cfg"]["layers"]
    assert bb.vision_width == TINY_CONFIG["vision_cfg"]["width"]
    assert bb.vision_depth == TINY_CONFIG["vision_cfg"]["layers"]
    assert bb.context_length == TINY_CONFIG["text_cfg"]["context_length"]
    assert bb.image_size == TINY_CONFIG["vision_cfg"]["image_size"]
    assert bb.image_mean == pytest.approx(OPENAI_MEAN)
    assert bb.image_std == pytest.approx(OPENAI_STD)
    assert bb.positional_embedding.shape == (bb.context_length, bb.text_width)
    assert bb.logit_scale == pytest.approx(bb.model.logit_scale.exp().item())
    assert isinstance(bb.logit_scale, float)


def test_tokenize_words_has_no_special_tokens(bb):
    words = bb.tokenize_words("a photo of a")
    assert len(words) == 4
    assert bb.sot_id not in words and bb.eot_id not in words
    full = bb.tokenize(["a photo of a"])[0]
    assert full[:6].tolist() == [bb.sot_id, *words, bb.eot_id]
    assert full.shape == (bb.context_length,)


# ---------------------------------------------------------------------- text


def test_encode_text_embeddings_equals_open_clip_encode_text(bb):
    tokens = bb.tokenize(TEXTS)
    with torch.no_grad():
        ours = bb.encode_text_embeddings(bb.embed_tokens(tokens), tokens)
        ref = bb.model.encode_text(tokens)
    assert ours.shape == (len(TEXTS), bb.embed_dim)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(bb.encode_text(tokens), ref, atol=1e-5, rtol=1e-4)


def test_features_do_not_depend_on_padding_beyond_the_end_token(bb):
    """Causal truncation: a batch padded to a longer prompt gives the same features."""
    short = bb.tokenize(TEXTS[:1])
    with torch.no_grad():
        alone = bb.encode_text(short)
        batched = bb.encode_text(bb.tokenize(TEXTS))[:1]
    assert torch.allclose(alone, batched, atol=1e-5, rtol=1e-4)


def test_identity_block_hook_is_called_once_per_block_in_order(bb):
    tokens = bb.tokenize(TEXTS[:2])
    calls = []

    def hook(i, x):
        calls.append((i, tuple(x.shape)))
        return x

    with torch.no_grad():
        plain = bb.encode_text_embeddings(bb.embed_tokens(tokens), tokens)
        hooked = bb.encode_text_embeddings(bb.embed_tokens(tokens), tokens, block_hook=hook)
    assert torch.equal(plain, hooked)
    longest = int(tokens.argmax(-1).max()) + 1  # sequences are cut after the last end token
    assert calls == [(i, (2, longest, bb.text_width)) for i in range(bb.text_depth)]


def test_block_hook_output_is_used(bb):
    tokens = bb.tokenize(TEXTS[:2])

    def hook(i, x):
        return x + 1.0 * (i == bb.text_depth - 1) * torch.randn_like(x)

    with torch.no_grad():
        plain = bb.encode_text(tokens)
        hooked = bb.encode_text_embeddings(bb.embed_tokens(tokens), tokens, block_hook=hook)
    assert not torch.allclose(plain, hooked, atol=1e-3)


def test_add_positional_false_lets_the_caller_add_positions(bb):
    tokens = bb.tokenize(TEXTS[:2])
    emb = bb.embed_tokens(tokens)
    with torch.no_grad():
        ref = bb.encode_text_embeddings(emb, tokens)
        manual = bb.encode_text_embeddings(emb + bb.positional_embedding, tokens, add_positional=False)
        missing = bb.encode_text_embeddings(emb, tokens, add_positional=False)
    assert torch.allclose(manual, ref, atol=1e-5)
    assert not torch.allclose(missing, ref, atol=1e-3)


# -------------------------------------------------------------------- vision


def test_embed_image_then_tokens_equals_encode_image(bb):
    x = images(3)
    with torch.no_grad():
        tokens = bb.embed_image(x)
        ours = bb.encode_image_tokens(tokens)
        ref = bb.encode_image(x)
        via_model = bb.model.encode_image(x)
    patches = (TINY_CONFIG["vision_cfg"]["image_size"] // TINY_CONFIG["vision_cfg"]["patch_size"]) ** 2
    assert tokens.shape == (3, 1 + patches, bb.vision_width)
    assert ref.shape == (3, bb.embed_dim)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)
    assert torch.allclose(ref, via_model, atol=1e-6)


def test_vision_block_hook_called_per_block(bb):
    x = images(2)
    seen = []
    with torch.no_grad():
        ref = bb.encode_image(x)
        out = bb.encode_image_tokens(bb.embed_image(x), block_hook=lambda i, t: seen.append(i) or t)
    assert seen == list(range(bb.vision_depth))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------- frozen


def test_backbone_stays_frozen_and_in_eval_mode(bb):
    assert all(not p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training
    assert not any(m.training for m in bb.modules())

    parent = torch.nn.Module()
    parent.backbone = bb
    parent.train()
    assert parent.training
    assert not any(m.training for m in bb.modules())
    assert all(not p.requires_grad for p in bb.parameters())


# -------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "opts, field, words",
    [
        ({"model": "no-such-model-xyz", "pretrained": None}, "backbone.model", "no-such-model-xyz"),
        ({"model": "/nonexistent/cfg.json", "pretrained": None}, "backbone.model", "/nonexistent/cfg.json"),
        ({"model": "RN50", "pretrained": "/nonexistent/weights.pt"}, "backbone.pretrained", "/nonexistent/weights.pt"),
        ({"model": "RN50", "pretrained": "no_such_tag"}, "backbone.pretrained", "no_such_tag"),
    ],
    ids=["unknown-model", "missing-config", "missing-checkpoint", "unknown-tag"],
)
def test_bad_model_or_weights_are_user_errors(opts, field, words, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as exc:
        build_open_clip(OpenClipOptions(**opts))
    message = str(exc.value)
    assert message.startswith(field + ":")
    assert words in message


def test_unknown_tag_error_lists_the_known_tags(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="openai"):
        build_open_clip(OpenClipOptions(model="RN50", pretrained="no_such_tag"))


def test_checkpoint_for_another_architecture_is_a_user_error(bb, tmp_path):
    other = dict(TINY_CONFIG, embed_dim=16)
    cfg = tmp_path / "tiny_other.json"
    import json

    cfg.write_text(json.dumps(other))
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="backbone.pretrained"):
        build_open_clip(OpenClipOptions(model=str(cfg), pretrained=str(path)))


# ------------------------------------------------------------------- weights


def test_safetensors_checkpoint_gives_identical_weights(bb, world, tmp_path):
    path = tmp_path / "tiny.safetensors"
    saved = {k: v.clone().contiguous() for k, v in bb.model.state_dict().items()}
    save_file(saved, str(path))
    torch.manual_seed(1234)  # a different random init, overwritten by the file
    loaded = build_open_clip(OpenClipOptions(model=str(world["config"]), pretrained=str(path)))
    state = loaded.model.state_dict()
    assert set(state) == set(saved)
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    tokens = bb.tokenize(TEXTS[:1])
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), bb.encode_text(tokens))


@pytest.fixture(scope="module")
def openai_model():
    """A tiny CLIP in the OpenAI layout (heads = width / 64, QuickGELU), weights
    rounded to fp16 as OpenAI checkpoints store them."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(
        32,
        CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=16),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
        quick_gelu=True,
    ).eval()
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return model


def _check_openai_load(loaded, model):
    state = loaded.model.state_dict()
    ref = model.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert torch.equal(state[k].float(), v), k
    assert loaded.text_width == 64 and loaded.vision_width == 64
    assert loaded.context_length == 77 and loaded.image_size == 16
    tokens = loaded.tokenize(["a photo of a dog."])
    x = images(2)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-5)
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-5)


def test_openai_state_dict_checkpoint(openai_model, tmp_path):
    path = tmp_path / "openai_sd.pt"
    torch.save(openai_model.state_dict(), path)
    loaded = build_open_clip(OpenClipOptions(model="ViT-B-32", pretrained=str(path), format="openai"))
    _check_openai_load(loaded, openai_model)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_openai_torchscript_archive_is_detected_by_auto(openai_model, tmp_path, monkeypatch):
    """format: auto recognises a TorchScript archive and loads it the OpenAI way, its
    tensors read as data: ``torch.jit.load`` (which compiles and runs the archive's
    code) is never called, and tensors that are no weights (the mask) are left out."""
    import copy

    model = copy.deepcopy(openai_model)
    mask = model.attn_mask
    del model._buffers["attn_mask"]  # OpenAI archives do not store the causal mask
    model.attn_mask = mask
    tokens = torch.zeros(1, 77, dtype=torch.long)
    traced = torch.jit.trace_module(model, {"encode_text": (tokens,), "encode_image": (images(1),)})
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    loaded = build_open_clip(OpenClipOptions(model="ViT-B-32", pretrained=str(path)))
    _check_openai_load(loaded, openai_model)



class _Marker:
    """Unpickling this creates the file ``path``: what a malicious checkpoint would do
    with ``os.system``, harmlessly."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _malicious(kind: str, path: Path, marker: Path) -> None:
    payload = {"visual.proj": _Marker(marker), "text_projection": torch.zeros(2, 2)}
    if kind == "pickle":
        import pickle

        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save({"state_dict": payload}, path)
        if kind == "torchscript":  # what makes it look like a TorchScript archive
            import zipfile

            with zipfile.ZipFile(path, "a") as zf:
                zf.writestr(f"{path.stem}/constants.pkl", b"")


@pytest.mark.parametrize("kind, fmt", [("pickle", "openai"), ("torch.save", "openai"), ("torchscript", "auto"),
                                       ("torch.save", "auto"), ("pickle", "auto")])
def test_a_checkpoint_holding_python_objects_is_refused_unrun(kind, fmt, world, tmp_path):
    path, marker = tmp_path / "weights.pt", tmp_path / "pwned"
    _malicious(kind, path, marker)
    model = "ViT-B-32" if fmt == "openai" else str(world["config"])
    with pytest.raises(UserError) as exc:
        build_open_clip(OpenClipOptions(model=model, pretrained=str(path), format=fmt))
    [line] = exc.value.problems
    assert line.startswith(f"backbone.pretrained: {path}: refused: the file holds Python objects"), line
    assert "could run code" in line and "\n" not in line
    assert not marker.exists()


def test_files_that_are_no_checkpoint_are_user_errors(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    for path, words in ((text, "not a PyTorch checkpoint"), (empty, "not a state dict of tensors")):
        with pytest.raises(UserError) as exc:
            build_open_clip(OpenClipOptions(model="ViT-B-32", pretrained=str(path), format="openai"))
        [line] = exc.value.problems
        assert line.startswith(f"backbone.pretrained: {path}: {words}"), line


def test_no_code_unpickles_arbitrary_objects():
    """Every torch.load in vlprompt and its plug-ins is weights-only; none calls torch.jit.load."""
    import re

    root = Path(__file__).resolve().parents[1]
    for source in [*root.glob("vlprompt_core/**/*.py"), *root.glob("plugins/*/src/**/*.py")]:
        text = source.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (source, call)
        assert "jit.load(" not in text, source


# ------------------------------------------------------------ pretrained tags


@pytest.fixture()
def unreachable_hub(monkeypatch, tmp_path):
    """No network: the hub's address refuses connections, nothing is cached, and
    offline mode is off (so only the reachability check can tell)."""
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    return hub


@pytest.fixture
def no_waiting(monkeypatch):
    """Fail at once, not after retries: any sleep (a retry's back-off) fails the test.
    (No wall-clock bound: that would depend on the machine's speed.)"""
    import time

    def sleep(seconds):
        raise AssertionError(f"waited {seconds} s: a download that cannot succeed was retried")

    monkeypatch.setattr(time, "sleep", sleep)


def test_a_tag_that_cannot_be_fetched_fails_at_once_with_one_line(unreachable_hub, no_waiting, caplog):
    with pytest.raises(UserError) as exc:
        build_open_clip(OpenClipOptions(model="ViT-B-32", pretrained="openai"))
    [line] = exc.value.problems
    assert line.startswith("backbone.pretrained: cannot download the 'openai' weights of 'ViT-B-32': "
                           "127.0.0.1:9 cannot be reached"), line
    assert "set pretrained: to a local checkpoint file" in line
    assert not [r for r in caplog.records if r.levelno >= 30], caplog.records  # nothing logged beside it


def test_a_run_with_such_a_tag_stops_with_one_error_line(unreachable_hub, no_waiting, registry, world, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from vlprompt_core.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "backbone": {"name": "open_clip", "model": "ViT-B-32", "pretrained": "openai"},
        "method": {"name": "zeroshot"}, "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 1}, "train": {"seeds": [1]}, "output": str(tmp_path / "out"),
    }))
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "warn" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: backbone.pretrained: cannot download the 'openai' "
                                                     "weights of 'ViT-B-32': 127.0.0.1:9 cannot be reached"), errors


def test_offline_mode_without_the_weights_in_the_cache_fails_at_once(unreachable_hub, monkeypatch):
    monkeypatch.setattr(unreachable_hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="offline mode is on .* not in its cache; download them once"):
        build_open_clip(OpenClipOptions(model="ViT-B-32", pretrained="openai"))


def test_cached_weights_of_a_tag_are_found_without_the_network(unreachable_hub):
    import open_clip

    from vlprompt_core.builtin.open_clip_backbone import _cached_weights

    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert _cached_weights(tag) is None
    repo = Path(unreachable_hub.HF_HUB_CACHE) / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    weights = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    weights.write_bytes(b"")
    assert _cached_weights(tag) == str(weights)


# ------------------------------------------------------------- deep prompts


def test_vision_embedding_splits_at_the_pre_norm(bb):
    x = images(2)
    with torch.no_grad():
        raw = bb.embed_image(x, pre_norm=False)
        normed = bb.embed_image(x)
        assert torch.allclose(bb.vision_pre_norm(raw), normed, atol=1e-6)
        assert not torch.allclose(raw, normed, atol=1e-3)
        # by hand: conv patches, class token first, positions
        v = bb.model.visual
        patches = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.expand(2, 1, -1)
        assert torch.allclose(raw, torch.cat([cls, patches], 1) + v.positional_embedding, atol=1e-6)


def test_image_head_pools_the_class_token(bb):
    tokens = torch.randn(2, 5, bb.vision_width)
    v = bb.model.visual
    with torch.no_grad():
        assert torch.allclose(bb.image_head(tokens), v.ln_post(tokens[:, 0]) @ v.proj, atol=1e-6)


def test_text_head_is_norm_pool_project(bb):
    tokens = bb.tokenize(TEXTS[:2])
    hidden = torch.randn(2, tokens.shape[1], bb.text_width)
    t = bb.model
    with torch.no_grad():
        pooled = t.ln_final(hidden)[torch.arange(2), tokens.argmax(-1)]
        assert torch.allclose(bb.text_head(hidden, tokens), pooled @ t.text_projection, atol=1e-6)
    assert bb.pool_positions(tokens).tolist() == tokens.argmax(-1).tolist()


def test_hooks_that_break_their_contract_are_clear_errors(bb):
    from vlprompt_core.api import ContractError

    tokens = bb.tokenize(TEXTS[:2])
    with pytest.raises(ContractError, match="text block_hook before block 1 changed the tokens"):
        bb.encode_text_embeddings(bb.embed_tokens(tokens), tokens,
                                  block_hook=lambda i, x: torch.cat([x, x[:, :1]], 1) if i == 1 else x)
    x = bb.embed_image(images(2))
    with pytest.raises(ContractError, match="batch size or width"):
        bb.encode_image_tokens(x, block_hook=lambda i, t: t[:1])
    with pytest.raises(ContractError, match=r"\[N, L, W\]"):
        bb.encode_image_tokens(x, block_hook=lambda i, t: None)
    # inserting and later removing image tokens is allowed
    with torch.no_grad():
        def insert_then_remove(i, t):
            return torch.cat([t[:, :1], torch.zeros(2, 3, bb.vision_width), t[:, 1:]], 1) if i == 0 else t[:, :1]
        out = bb.encode_image_tokens(x, block_hook=insert_then_remove)
    assert out.shape == (2, bb.embed_dim)


def test_capabilities_and_require(bb, tmp_path):
    assert "vision_transformer" in bb.capabilities
    bb.require("vision_transformer", "method x")  # no error
    import json

    cfg = tmp_path / "tiny_rn.json"
    cfg.write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    rn = build_open_clip(OpenClipOptions(model=str(cfg), pretrained=None))
    assert rn.capabilities == frozenset()
    with pytest.raises(UserError) as exc:
        rn.require("vision_transformer", "method 'provp'")
    assert str(exc.value) == ("method 'provp' needs a ViT image tower (visual prompts go into its blocks); "
                              "backbone tiny_rn (ModifiedResNet image tower) has none")
    with pytest.raises(UserError, match="needs a ViT"):
        rn.embed_image(torch.randn(1, 3, 32, 32))


def test_check_lists_every_problem_without_loading(tmp_path):
    from vlprompt_core.builtin.open_clip_backbone import check_open_clip

    assert check_open_clip(OpenClipOptions()) == []  # the embedded default
    assert check_open_clip(OpenClipOptions(model="ViT-B-32", pretrained="openai")) == []
    assert check_open_clip(OpenClipOptions(model="nope", pretrained=str(tmp_path / "w.pt"))) == [
        "backbone.model: unknown open_clip model 'nope' (see open_clip.list_models())",
        f"backbone.pretrained: checkpoint file not found: {tmp_path / 'w.pt'}",
    ]
    assert check_open_clip(OpenClipOptions(model="ViT-B-32", pretrained="embedded")) == [
        "backbone.pretrained: 'embedded' weights exist only for model 'vlprompt_tiny'"]


def test_a_model_config_is_read_alone_and_the_file_given_last_wins_its_name(tmp_path, monkeypatch):
    """open_clip's own registration reads every config it knows again; ours reads the one
    file, and (as open_clip's) the file registered last decides what the name means."""
    import json

    import open_clip
    from open_clip import factory

    from vlprompt_core.builtin.open_clip_backbone import configs

    first, second = dict(TINY_CONFIG), {**TINY_CONFIG, "embed_dim": TINY_CONFIG["embed_dim"] * 2}
    for folder, config in (("a", first), ("b", second)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "vlprompt_named_twice.json").write_text(json.dumps(config))
    monkeypatch.setattr(factory, "_rescan_model_configs", lambda: pytest.fail("every config read again"))
    for folder, config in (("a", first), ("b", second), ("a", first)):
        assert configs.register_model_config(tmp_path / folder / "vlprompt_named_twice.json") == "vlprompt_named_twice"
        assert open_clip.get_model_config("vlprompt_named_twice") == config
        assert configs.tokenizer("vlprompt_named_twice") is configs.tokenizer("vlprompt_named_twice")
