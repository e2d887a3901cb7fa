"""Reading checkpoint files as data, never code: a ``torch.save`` file goes through
PyTorch's weights-only unpickler (:func:`_load_tensors`), a TorchScript archive is
read without ``torch.jit.load`` (:func:`_torchscript_state_dict`: its ``code/`` only
as text, its ``data.pkl`` with a stand-in per TorchScript class), and a file that
holds other Python objects is refused with a one-line :class:`UserError`
(:func:`_refused`) rather than run. :func:`_load_openai_model` builds an original
OpenAI CLIP checkpoint (archive or state dict) into open_clip's ``CLIP`` this way.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from .options import OPENAI_MEAN, OPENAI_STD


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
