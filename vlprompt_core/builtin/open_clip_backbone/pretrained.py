"""From :class:`OpenClipOptions` to an open_clip model: :func:`check_open_clip`
says what is wrong without loading weights (unknown model or tag, missing file),
and :func:`_create_open_clip_model` makes the model from a pretrained tag (its
weights found in the user's cache, or the hub checked to answer within seconds
before a download is tried), a checkpoint file (OpenAI CLIP files through
:mod:`.checkpoints`), the embedded tiny CLIP, or random weights, holding back
what open_clip and huggingface_hub log when making it fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import threading
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from torch import nn

from ...data import expand_user
from ...errors import UserError
from .checkpoints import _first_line, _is_torchscript, _load_openai_model, _refused
from .configs import register_model_config
from .options import EMBEDDED_CONFIG, EMBEDDED_MODEL, EMBEDDED_WEIGHTS, OpenClipOptions

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
    elif opts.pretrained is not None and config is not None and not problems:
        if not open_clip.get_pretrained_cfg(config.stem, opts.pretrained):  # tags are open_clip's, by model name
            takes = "'embedded' (its own weights) or " if opts.model == EMBEDDED_MODEL else ""
            problems.append(
                f"backbone.pretrained: no tag {opts.pretrained!r} for {opts.model!r} (pretrained tags name the "
                f"weights of open_clip's own models), and no such file; it takes {takes}a checkpoint file, or null "
                "(random weights)"
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
        model_name = register_model_config(config)

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
