"""The ``open_clip`` backbone: any open_clip model, frozen, seen through
:class:`~vlprompt_core.api.VisionLanguageBackbone`.

Weights come from a pretrained tag (the user's cache or the hub), a local
checkpoint file (open_clip format, or an original OpenAI CLIP archive / state
dict as the reference research code loads), the project's embedded tiny CLIP
(``pretrained: embedded``), or nowhere (random init, for tests).

A checkpoint file is data, never code: it is read as tensors only (safetensors, or
PyTorch's weights-only unpickler, TorchScript archives included), so a file that
holds other Python objects is refused rather than run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import pickletools
import re
import socket
import threading
import urllib.parse
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .. import hookimpl, textbook
from ..api import BackboneEntry, ContractError, Options, TextPrefix, VisionLanguageBackbone
from ..data import expand_user
from ..embedded import pretrain as embedded
from ..errors import UserError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: The embedded default: a tiny CLIP pretrained by ``python -m vlprompt_core.embedded.pretrain``.
EMBEDDED_MODEL = embedded.MODEL_NAME
EMBEDDED_CONFIG = embedded.CONFIG_PATH
EMBEDDED_WEIGHTS = embedded.weights_path()


class OpenClipOptions(Options):
    """``backbone: {name: open_clip, model: ..., pretrained: ...}``"""

    model: str = Field(
        "vlprompt_tiny",
        description="open_clip model name (see open_clip.list_models()), or a path to a "
        "model config JSON; ignored for OpenAI-format checkpoints, whose architecture is read from the weights",
    )
    pretrained: str | None = Field(
        "embedded",
        description="a pretrained tag (e.g. 'openai', 'laion2b_s34b_b79k'), a checkpoint file path, "
        "'embedded' for the shipped tiny CLIP, or null for random weights",
    )
    format: Literal["auto", "open_clip", "openai"] = Field(
        "auto",
        description="checkpoint file format; 'auto' treats TorchScript archives as OpenAI CLIP",
    )
    quick_gelu: bool | None = Field(
        None,
        description="force QuickGELU; by default it follows the pretrained tag "
        "(OpenAI weights need it; a mismatch silently hurts accuracy)",
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _starts_with_a_pickle(path: Path) -> bool:
    """Whether the file begins with a well-formed pickle (as ``torch.save``'s legacy
    format does), parsed without being unpickled."""
    with open(path, "rb") as f:
        try:
            for _ in pickletools.genops(f):
                pass
        except Exception:  # noqa: BLE001 - any parse failure means: not a pickle
            return False
    return True


def _refused(path: Path, exc: pickle.UnpicklingError) -> str:
    """The message for a file the weights-only unpickler refuses: a checkpoint holding
    Python objects besides tensors, or no checkpoint at all."""
    if not (zipfile.is_zipfile(path) or _starts_with_a_pickle(path)):
        return f"backbone.pretrained: {path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    found = re.search(r"GLOBAL (\S+)", str(exc))
    what = f" ({found.group(1)})" if found else ""
    return (f"backbone.pretrained: {path}: refused: the file holds Python objects{what}, not only tensors, and "
            "unpickling them could run code; save the weights as tensors (a state dict, or safetensors)")


def _load_tensors(path: Path):
    """What a ``torch.save`` file holds, through PyTorch's weights-only unpickler
    (tensors and plain containers; anything else is refused, never constructed)."""
    try:
        with warnings.catch_warnings():  # the refusal says it all; no warning beside it about pickle protocols
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(_refused(path, exc)) from None
    except (RuntimeError, ValueError, EOFError, OSError) as exc:
        raise UserError(f"backbone.pretrained: {path}: not a PyTorch checkpoint ({_first_line(exc)})") from None


class _ScriptObject:
    """Stands for an object of a TorchScript class while an archive is unpickled:
    keeps its attributes (one subclass per class, named by ``qualified_name``)."""

    qualified_name = ""

    def __setstate__(self, state) -> None:
        self.attributes = state if isinstance(state, dict) else {}


def _script_classes(data_pkl: bytes) -> list[str]:
    """The TorchScript classes (``__torch__.…``) a pickle names, read without unpickling it."""
    names = set()
    for opcode, arg, _ in pickletools.genops(data_pkl):
        if opcode.name == "GLOBAL":
            module, _, name = arg.partition(" ")
            if module == "__torch__" or module.startswith("__torch__."):
                names.add(f"{module}.{name}")
    return sorted(names)


def _declared_tensors(zf: zipfile.ZipFile, root: str, qualified_name: str) -> set[str]:
    """The parameter and buffer names of a TorchScript class, read as text from its
    definition in the archive's ``code/`` (``__parameters__ = [...]``, ``__buffers__ = [...]``):
    the other tensor attributes (a causal mask, say) are not weights."""
    module, _, name = qualified_name.rpartition(".")
    try:
        source = zf.read(f"{root}code/{module.replace('.', '/')}.py").decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        source = ""
    body = re.search(rf"^class {re.escape(name)}\(.*\n((?:[ \t].*\n|\n)*)", source, re.MULTILINE)
    lists = [body and re.search(rf"^\s+{key} = \[(.*?)\]", body.group(1), re.MULTILINE | re.DOTALL)
             for key in ("__parameters__", "__buffers__")]
    if not all(lists):
        raise UserError(f"backbone.pretrained: {zf.filename}: TorchScript class {qualified_name} has no list of "
                        "parameters in the archive's code; not an archive vlprompt can read as weights")
    return {n for found in lists for n in re.findall(r'"([^"]*)"', found.group(1))}


def _torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, read without running it.

    ``torch.jit.load`` compiles the archive's ``code/`` (TorchScript source, which can
    call operators that read and write files) and runs the ``__setstate__`` methods it
    defines: a downloaded archive could act on the machine. Here ``code/`` is only read
    as text (which attributes are parameters or buffers), and ``data.pkl`` goes through
    PyTorch's weights-only unpickler, the one ``torch.load(weights_only=True)`` uses
    (which refuses TorchScript archives as a whole), with each TorchScript class a
    stand-in that keeps its attributes and runs nothing. A global that is neither a
    TorchScript class nor a tensor is refused."""
    from torch import _weights_only_unpickler
    from torch.jit import _pickle as script_pickle

    try:
        with zipfile.ZipFile(path) as zf:
            found = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not found:
                raise UserError(f"backbone.pretrained: {path}: a TorchScript archive without data.pkl")
            root = found[0][: -len("data.pkl")]
            classes = {name: type(name.rpartition(".")[2], (_ScriptObject,), {"qualified_name": name})
                       for name in _script_classes(zf.read(found[0]))}
            allowed = [(cls, name) for name, cls in classes.items()] + [
                script_pickle.build_intlist, script_pickle.build_tensorlist, script_pickle.build_doublelist,
                script_pickle.build_boollist, script_pickle.restore_type_tag]
            with torch.serialization.safe_globals(allowed), \
                    torch.serialization._open_zipfile_reader(str(path)) as reader:
                top = torch.serialization._load(reader, "cpu", _weights_only_unpickler, weights_only=True,
                                                encoding="utf-8")
            if not isinstance(top, _ScriptObject):
                raise UserError(f"backbone.pretrained: {path}: a TorchScript archive that holds no module")
            state, declared, pending, seen = {}, {}, [("", top)], set()
            while pending:
                prefix, obj = pending.pop()
                if id(obj) in seen:  # each module once: a pickle may share one, or loop (OpenAI CLIP shares none)
                    continue
                seen.add(id(obj))
                name = obj.qualified_name
                if name not in declared:
                    declared[name] = _declared_tensors(zf, root, name)
                for attr, value in getattr(obj, "attributes", {}).items():  # none: never built
                    if isinstance(value, _ScriptObject):
                        pending.append((f"{prefix}{attr}.", value))
                    elif attr in declared[name] and isinstance(value, torch.Tensor):
                        state[prefix + attr] = value
            return state
    except pickle.UnpicklingError as exc:
        raise UserError(_refused(path, exc)) from None
    except (RuntimeError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"backbone.pretrained: {path}: cannot read the TorchScript archive "
                        f"({_first_line(exc)})") from None


def _load_openai_model(path: Path) -> nn.Module:
    """An original OpenAI CLIP checkpoint (TorchScript archive or state dict) as an
    open_clip ``CLIP`` in fp32: architecture read from the weights, QuickGELU as trained.

    What ``open_clip.load_openai_model`` does, without its ``torch.jit.load`` (see
    :func:`_torchscript_state_dict`) or its fallback to an unrestricted ``torch.load``."""
    from open_clip.model import build_model_from_openai_state_dict

    state = _torchscript_state_dict(path) if _is_torchscript(path) else _load_tensors(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint, keys prefixed by DataParallel's "module."
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise UserError(f"backbone.pretrained: {path}: not a state dict of tensors, nor an OpenAI CLIP archive")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model = build_model_from_openai_state_dict(state, cast_dtype=None)
    except (KeyError, RuntimeError, ValueError, IndexError, AssertionError, TypeError) as exc:
        raise UserError(f"backbone.pretrained: {path} is not an OpenAI CLIP checkpoint ({_first_line(exc)})") \
            from None
    model.float()
    model.visual.image_mean, model.visual.image_std = OPENAI_MEAN, OPENAI_STD
    return model.eval()


# ------------------------------------------------------------ pretrained tags

#: Seconds to wait for the hub (or a proxy) to accept a connection before saying it cannot be reached.
REACH_TIMEOUT = 3.0


def _cached_weights(cfg: dict) -> str | None:
    """The local file of a pretrained tag's weights when they were downloaded before
    (the Hugging Face cache, or open_clip's ``~/.cache/clip`` for URL downloads),
    looked up as open_clip's download would look for them; None otherwise."""
    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        safe = (HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME
                else filename[:-4] + ".safetensors" if filename.endswith((".bin", ".pth")) else None)
        for name in filter(None, (safe, filename)):  # open_clip prefers the safetensors file
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return found
        return None
    if cfg.get("url"):
        target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        return str(target) if target.is_file() else None
    return None


def _unreachable(url: str, timeout: float = REACH_TIMEOUT) -> str | None:
    """Why ``url``'s host (or the proxy the environment puts in front of it) does
    not accept a connection within ``timeout`` seconds, or None when it does. The
    attempt runs in a thread so that a slow name lookup cannot hold it up either."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"{url} is not a valid address"
    if not host:
        return f"{url} is not a valid address"
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port} cannot be reached ({exc.strerror or exc})")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{host}:{port} does not answer within {timeout:.0f} s"


def _fetch_problem(cfg: dict) -> str | None:
    """Why the weights of a pretrained tag that is not cached cannot be downloaded,
    found out in seconds (offline mode, or the host not answering); None when a
    download is worth trying. Without this, huggingface_hub retries for a minute."""
    import huggingface_hub.constants as hub

    if cfg.get("hf_hub"):
        if hub.is_offline_mode():
            return "Hugging Face offline mode is on (HF_HUB_OFFLINE) and they are not in its cache"
        return _unreachable(hub.ENDPOINT)
    return _unreachable(cfg.get("url", ""))


class _Holder(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _held_library_logs():
    """Hold what open_clip (on the root logger) and huggingface_hub log, and the
    warnings they issue, while a model is made: passed on when it is made, dropped
    when making it fails, since the UserError then says it once (not beside
    open_clip's own ``ERROR root: Failed to download ...``)."""
    root = logging.getLogger()
    handlers, holder = root.handlers[:], _Holder()
    root.handlers = [holder]
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        root.handlers = handlers
    for record in holder.records:
        root.handle(record)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _model_config(opts: OpenClipOptions) -> Path | None:
    """The config file a model name refers to (the embedded model, or a JSON path)."""
    if opts.model == EMBEDDED_MODEL:
        return Path(EMBEDDED_CONFIG)
    if opts.model.endswith(".json"):
        return expand_user(Path(opts.model))
    return None


def _checkpoint_path(opts: OpenClipOptions) -> Path | None:
    """``pretrained`` as a file path, when it names one (or looks like one)."""
    p = opts.pretrained
    if p is None or p == "embedded":
        return None
    path = expand_user(Path(p))
    return path if (path.suffix or "/" in p or path.is_file()) else None


def check_open_clip(opts: OpenClipOptions) -> list[str]:
    """What is wrong with ``opts`` that can be told without loading weights: one line each."""
    import open_clip

    problems = []
    config = _model_config(opts)
    checkpoint = _checkpoint_path(opts)
    openai_file = checkpoint is not None and (
        opts.format == "openai" or (opts.format == "auto" and checkpoint.is_file() and _is_torchscript(checkpoint))
    )
    if config is not None:
        if not config.is_file():
            problems.append(f"backbone.model: model config file not found: {config}")
    elif opts.model not in open_clip.list_models() and not openai_file:
        problems.append(f"backbone.model: unknown open_clip model {opts.model!r} (see open_clip.list_models())")
    if opts.pretrained == "embedded":
        if opts.model != EMBEDDED_MODEL:
            problems.append(f"backbone.pretrained: 'embedded' weights exist only for model {EMBEDDED_MODEL!r}")
        elif not EMBEDDED_WEIGHTS.is_file():
            problems.append(f"backbone.pretrained: embedded weights missing: {EMBEDDED_WEIGHTS}")
    elif checkpoint is not None:
        if not checkpoint.is_file():
            problems.append(f"backbone.pretrained: checkpoint file not found: {checkpoint}")
    elif opts.pretrained is not None and config is None and not problems:
        if not open_clip.get_pretrained_cfg(opts.model, opts.pretrained):
            tags = ", ".join(t for m, t in open_clip.list_pretrained() if m == opts.model) or "none"
            problems.append(
                f"backbone.pretrained: no tag {opts.pretrained!r} for {opts.model!r} (tags: {tags}), and no such file"
            )
    return problems


def _create_open_clip_model(opts: OpenClipOptions) -> tuple[nn.Module, str]:
    """The model and the name its tokenizer is registered under."""
    import open_clip

    problems = check_open_clip(opts)
    if problems:
        raise UserError(*problems)
    config = _model_config(opts)
    model_name = opts.model
    if config is not None:
        open_clip.add_model_config(config)
        model_name = config.stem

    pretrained = str(EMBEDDED_WEIGHTS) if opts.pretrained == "embedded" else opts.pretrained
    path = _checkpoint_path(opts)
    quick_gelu = opts.quick_gelu
    preprocess = None
    if path is not None:
        if opts.format == "openai" or (opts.format == "auto" and _is_torchscript(path)):
            # Every OpenAI CLIP uses the same BPE tokenizer, registered under any OpenAI name.
            return _load_openai_model(path), "ViT-B-32"
        pretrained = str(path)
    elif pretrained is not None and opts.pretrained != "embedded":
        tag = open_clip.get_pretrained_cfg(model_name, pretrained)
        if quick_gelu is None:
            quick_gelu = bool(tag.get("quick_gelu", False))
        cached = _cached_weights(tag) if tag else None
        if cached is not None:  # no network needed: load the file, with the tag's preprocessing
            pretrained, preprocess = cached, tag
        elif tag and (why := _fetch_problem(tag)):
            from huggingface_hub.constants import HF_HUB_CACHE

            cache = HF_HUB_CACHE if tag.get("hf_hub") else "~/.cache/clip"
            raise UserError(
                f"backbone.pretrained: cannot download the {pretrained!r} weights of {model_name!r}: {why}; "
                f"download them once where the network is reachable (they stay in {cache}), or set "
                "pretrained: to a local checkpoint file"
            )
    try:
        with _held_library_logs():
            model = open_clip.create_model(model_name, pretrained=pretrained, force_quick_gelu=bool(quick_gelu),
                                           force_preprocess_cfg=preprocess, device="cpu")
        return model, model_name
    except pickle.UnpicklingError as exc:
        raise UserError(_refused(path or Path(pretrained), exc)) from None
    except (RuntimeError, AssertionError, KeyError, ValueError, EOFError, StopIteration) as exc:
        first = _first_line(exc)
        if path is not None or opts.pretrained == "embedded":
            raise UserError(
                f"backbone.pretrained: {path or pretrained} does not fit model {model_name!r} ({first}); "
                "for an original OpenAI CLIP file set format: openai"
            ) from None
        if preprocess is not None:
            raise UserError(f"backbone.pretrained: the cached {opts.pretrained!r} weights ({pretrained}) cannot be "
                            f"loaded ({first}); delete the file to download it again") from None
        if isinstance(exc, RuntimeError) and ("download" in first.lower() or "offline" in first.lower()):
            raise UserError(f"backbone.pretrained: could not fetch weights {pretrained!r}: {first}") from None
        raise


class OpenClipBackbone(VisionLanguageBackbone):
    """A frozen open_clip ``CLIP`` (or ``CustomTextCLIP`` with open_clip's text tower).

    Everything goes through public module attributes of open_clip's
    ``TextTransformer`` and ``VisionTransformer`` (token/positional embeddings,
    ``conv1``, ``class_embedding``, ``ln_pre``, ``transformer.resblocks``,
    ``ln_post``, ``proj``...), never its private helpers; the tests check that the
    pieces put together equal open_clip's own ``encode_text``/``encode_image``.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, name: str = ""):
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self._tokenizer = tokenizer
        text = getattr(model, "text", model)
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        missing = [a for a in needed if not hasattr(text, a)]
        if missing:
            raise UserError(
                f"backbone.model: text tower {type(text).__name__} lacks {', '.join(missing)}; "
                "prompt methods need an open_clip TextTransformer"
            )
        self.text = text
        self.pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        self._eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        self.visual = model.visual

        self.embed_dim = int(getattr(self.visual, "output_dim", 0) or model.text_projection.shape[-1])
        self.text_width = int(text.token_embedding.weight.shape[1])
        self.text_depth = len(text.transformer.resblocks)
        vt = getattr(self.visual, "transformer", None)
        self.vision_width = int(vt.width) if vt is not None else 0
        self.vision_depth = len(vt.resblocks) if vt is not None else 0
        self.context_length = int(text.positional_embedding.shape[0])
        cfg = getattr(self.visual, "preprocess_cfg", {})
        size = cfg.get("size", getattr(self.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.image_mean = tuple(cfg.get("mean", getattr(self.visual, "image_mean", None) or OPENAI_MEAN))
        self.image_std = tuple(cfg.get("std", getattr(self.visual, "image_std", None) or OPENAI_STD))
        self.logit_scale = float(model.logit_scale.exp().item())
        inner = getattr(tokenizer, "tokenizer", tokenizer)
        self.sot_id = int(getattr(inner, "sot_token_id", 49406))
        self.eot_id = int(getattr(inner, "eot_token_id", self._eos_id or 49407))
        self._encode_words = getattr(inner, "encode", None)
        vit = all(hasattr(self.visual, a) for a in ("conv1", "class_embedding", "positional_embedding", "ln_pre",
                                                     "transformer", "ln_post"))
        vit = vit and getattr(self.visual, "attn_pool", None) is None and getattr(self.visual, "pool_type", "tok") == "tok"
        self.capabilities = frozenset({"vision_transformer"} if vit else ())
        self.text_prefix_sharing = _shares_prefixes(text, self.pool_type)
        self.description = f"{name or type(model).__name__} ({type(self.visual).__name__} image tower)"

    def train(self, mode: bool = True):
        """The backbone stays in eval mode whatever the parent module does."""
        return super().train(False)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts, context_length=self.context_length)

    def tokenize_words(self, text: str) -> list[int]:
        if self._encode_words is None:
            raise UserError("backbone: this tokenizer cannot encode words without special tokens")
        return list(self._encode_words(text))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.token_embedding(tokens)

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self.text.positional_embedding

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self._eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full(tokens.shape[:1], tokens.shape[1] - 1, device=tokens.device)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[:1], dtype=torch.long, device=tokens.device)
        raise UserError(f"backbone: text pooling {self.pool_type!r} is not supported")

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text_embeddings(self.embed_tokens(tokens), tokens)

    def encode_text_embeddings(self, embeddings, tokens, block_hook=None, add_positional=True):
        text = self.text
        cast = self._text_cast(embeddings)
        x = embeddings.to(cast)
        mask = text.attn_mask
        if mask is not None and self.pool_type in ("argmax", "eos") and not textbook.active():
            # causal: the pooled state depends only on the tokens up to it
            length = int(self.pool_positions(tokens).max()) + 1
            x, tokens = x[:, :length], tokens[:, :length]
            mask = mask[:length, :length]
        length = x.shape[1]
        if add_positional:
            x = x + text.positional_embedding[:length].to(cast)
        x = _run_blocks(text.transformer, x, mask, block_hook, "text", keep_length=True)
        return self.text_head(x, tokens)

    def text_head(self, hidden, tokens):
        # the pooled token first, then the (per-token) final norm: the same numbers, less work
        x = hidden[torch.arange(hidden.shape[0], device=hidden.device), self.pool_positions(tokens)]
        return self._text_output(x)

    def _text_output(self, x):
        """Final norm and projection of pooled states ``[..., text_width]``."""
        x = self.text.ln_final(x)
        proj = self.text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text_prefix(self, prefix: torch.Tensor) -> TextPrefix:
        """Each block runs on the prefixes as in the full pass (causal mask over P tokens);
        its keys and values are projected once per prefix, for all the suffixes."""
        x = prefix.to(self._text_cast(prefix))
        mask = self.text.attn_mask[: x.shape[1], : x.shape[1]]
        states = []
        for block in self.text.transformer.resblocks:
            x, keys, values = _prefix_block(block, x, mask)
            states.append((keys, values))
        return states

    def encode_text_suffix(self, prefix: TextPrefix, suffix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Every block by hand from its public parts (``ln_1``, ``attn``'s projections,
        ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``): the suffix tokens attend to their
        prefix's keys and values, never copied per class, and causally to each other."""
        n_prefix = prefix[0][0].shape[2]
        pool = self.pool_positions(tokens) - n_prefix  # [C], positions in the suffix
        length = int(pool.max()) + 1  # causal: nothing after the last pooled token matters
        x = suffix[:, :, :length].to(self._text_cast(suffix))
        mask = self.text.attn_mask[n_prefix : n_prefix + length, : n_prefix + length]
        for block, (keys, values) in zip(self.text.transformer.resblocks, prefix):
            x = _suffix_block(block, x, keys, values, mask)
        pooled = x[:, torch.arange(x.shape[1], device=x.device), pool]  # [G, C, W]
        return self._text_output(pooled)

    def _text_cast(self, x):
        transformer = self.text.transformer
        return transformer.get_cast_dtype() if hasattr(transformer, "get_cast_dtype") else x.dtype

    # ---------------------------------------------------------------- vision
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def _vit(self):
        self.require("vision_transformer", "this operation")
        return self.visual

    def embed_image(self, images, pre_norm=True):
        v = self._vit()
        x = v.conv1(images)  # [B, W, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, P, W]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)  # identity in eval mode (the backbone always is)
        return v.ln_pre(x) if pre_norm else x

    def vision_pre_norm(self, tokens):
        return self._vit().ln_pre(tokens)

    def encode_image_tokens(self, tokens, block_hook=None):
        v = self._vit()
        x = _run_blocks(v.transformer, tokens, None, block_hook, "image", keep_length=False)
        return self.image_head(x)

    def image_head(self, tokens):
        v = self._vit()
        pooled = v.ln_post(tokens[:, 0])  # a per-token norm: the same before or after pooling
        return pooled @ v.proj if v.proj is not None else pooled


def _run_blocks(transformer, x, mask, block_hook, tower: str, keep_length: bool):
    """The blocks of one tower, with ``block_hook`` before each, checked against its contract."""
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        if block_hook is not None:
            before = x.shape
            x = block_hook(i, x)
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                raise ContractError(f"{tower} block_hook before block {i} must return a [N, L, W] tensor")
            if keep_length and x.shape != before:
                raise ContractError(
                    f"{tower} block_hook before block {i} changed the tokens from {list(before)} to {list(x.shape)}; "
                    "text prompts must replace token states, not insert or remove tokens (pooling reads the "
                    "positions from the token ids)"
                )
            if x.shape[0] != before[0] or x.shape[2] != before[2]:
                raise ContractError(
                    f"{tower} block_hook before block {i} changed the batch size or width from {list(before)} "
                    f"to {list(x.shape)}; only the number of tokens may change"
                )
        if not batch_first:
            x = x.transpose(0, 1)
        x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
    return x


def _shares_prefixes(text, pool_type: str) -> bool:
    """Whether a text tower allows :meth:`OpenClipBackbone.encode_text_prefix`: a causal
    mask, pooling at a token (``argmax``/``eos``: the end token, after any shared
    prefix), and blocks that are open_clip's plain ``ResidualAttentionBlock`` (self-
    attention through ``nn.MultiheadAttention``'s packed projection, which
    :func:`_suffix_block` redoes by hand)."""
    from open_clip.transformer import ResidualAttentionBlock

    mask = text.attn_mask
    if mask is None or pool_type not in ("argmax", "eos"):
        return False
    causal = torch.full(mask.shape, float("-inf")).triu(1)
    if not torch.equal(mask.detach().float().cpu(), causal):
        return False
    for block in text.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            return False
        attn = block.attn
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            return False
    return True


def _prefix_block(block, x, mask):
    """One ``ResidualAttentionBlock`` on prefix tokens ``x`` ``[G, P, W]`` (causal ``mask``
    ``[P, P]``), by hand so that its keys and values ``[G, heads, P, head_dim]``, kept
    for the suffixes, come from the one projection the block itself uses."""
    attn = block.attn
    groups, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # [G, P, 3W]
    q, keys, values = qkv.unflatten(-1, (3, heads, width // heads)).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.dtype))
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(groups, length, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x))), keys, values


def _suffix_block(block, x, keys, values, mask):
    """One ``ResidualAttentionBlock`` on suffix tokens ``x`` ``[G, C, S, W]`` whose prompts
    begin with the prefix of ``keys``/``values`` ``[G, H, P, d]``; ``mask`` ``[S, P + S]`` is
    the additive causal mask of the suffix rows.

    Scores against the prefix are one matmul per (group, head) with the classes folded
    into the query rows, so the prefix keys and values are read, not copied, per class;
    one softmax covers prefix and suffix columns, as the full pass's attention does.
    """
    attn = block.attn
    groups, n_cls, length, width = x.shape
    heads = attn.num_heads
    n_prefix, head_dim = keys.shape[2], width // heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # [G, C, S, 3W]
    q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).permute(3, 0, 4, 1, 2, 5)  # each [G, H, C, S, d]
    q = q * head_dim**-0.5
    to_prefix = q.reshape(groups, heads, n_cls * length, head_dim) @ keys.transpose(-1, -2)
    scores = torch.cat([to_prefix.view(groups, heads, n_cls, length, n_prefix), q @ k.transpose(-1, -2)], dim=-1)
    probs = torch.softmax(scores + mask.to(scores.dtype), dim=-1)  # [G, H, C, S, P + S]
    from_prefix = probs[..., :n_prefix].reshape(groups, heads, n_cls * length, n_prefix) @ values
    out = from_prefix.view(groups, heads, n_cls, length, head_dim) + probs[..., n_prefix:] @ v
    out = out.permute(0, 2, 3, 1, 4).reshape(groups, n_cls, length, width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def build_open_clip(opts: OpenClipOptions) -> OpenClipBackbone:
    import open_clip

    model, tokenizer_name = _create_open_clip_model(opts)
    return OpenClipBackbone(model, open_clip.get_tokenizer(tokenizer_name), name=Path(opts.model).stem)


@hookimpl
def vlprompt_backbones():
    return [
        BackboneEntry(
            name="open_clip",
            options=OpenClipOptions,
            build=build_open_clip,
            description="any open_clip model: pretrained tag, checkpoint file, or the embedded tiny CLIP",
            check=check_open_clip,
        )
    ]
