"""Everything needed to continue a (method, seed) pair exactly where it stopped.

At the end of every epoch (and every ``train.checkpoint_every`` steps) the engine
writes one safetensors file per pair (``checkpoints/<label>-seed<N>-<key>.state.safetensors``):
the method's own state (trainable parameters and buffers; the frozen backbone is not the method's),
the optimiser's state, the random number generators (Python, NumPy, torch on the CPU
and every CUDA device, and the generator that orders the training data, as it was
when the epoch in flight began), the position (epoch, steps done in it, the epoch's
running loss and accuracy sums) and the epoch log so far. Tensors are tensors; everything else is JSON in the file's
metadata: nothing is pickled, so a state file cannot run code when it is read.

A run started again with the same command builds the pair as before, then loads
this state and continues from that position: on the CPU (and with the images read
in the main process, ``num_workers: 0``, for a mid-epoch position) the rest of the
run computes bit for bit what an uninterrupted run computes. The file is written to a
temporary name, flushed to disk and renamed, so a kill at any moment leaves the
previous epoch's state or the new one, never half a file.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .api import ContractError
from .errors import UserError
from .results import atomic_file

#: Bump when the layout of state files changes (older files are then not resumed).
FORMAT = "1"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors to ``path`` through a temporary file, flushed to disk, then renamed
    (:func:`~vlprompt_core.results.atomic_file`); the same tensors and metadata are
    the same bytes, in any process (:func:`_sort_header`)."""
    with atomic_file(path, sync=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_header(tmp)


def _sort_header(path: Path) -> None:
    """Write the JSON header of the safetensors file at ``path`` again with its keys in
    order. safetensors writes the metadata in hash order, which differs from one save
    to the next, so identical checkpoints would differ byte for byte (``vlprompt eval
    --from`` keys on a checkpoint's bytes). The header keeps its length (spaces pad it,
    as the format allows), so the tensors stay where they are."""
    with open(path, "rb+") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.dumps(json.loads(f.read(size)), sort_keys=True, separators=(",", ":"),
                            ensure_ascii=False).encode()
        if len(header) <= size:
            f.seek(8)
            f.write(header.ljust(size))
            return
        data = f.read()  # written longer than safetensors wrote it: the tensors move
        header += b" " * (-len(header) % 8)
        f.seek(0)
        f.write(len(header).to_bytes(8, "little") + header)
        f.write(data)
        f.truncate()


def _method_state(method: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The method's ``state_dict`` (the backbone is not in it: a method keeps it outside
    its module tree, :class:`~vlprompt_core.api.PromptMethod`): tensors, and the rest (a
    module's ``get_extra_state``), which must be JSON."""
    tensors, extra = {}, {}
    for k, v in method.state_dict().items():
        if isinstance(v, torch.Tensor):
            tensors[k] = v.detach().cpu().contiguous()
        else:
            extra[k] = v
    return tensors, extra


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """The optimiser state as tensors (``optimizer/<param>/<name>``) and JSON for the rest."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _join_optimizer(tensors: dict[str, torch.Tensor], data: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in data["plain"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": data["param_groups"]}


def _rng_state(data_state: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    tensors = {
        "rng/torch": torch.get_rng_state(),
        "rng/numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "rng/data": data_state,
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    py = random.getstate()
    plain = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], *map(_plain, np_state[2:])]}
    return tensors, plain


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict, data_generator: torch.Generator) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    data_generator.set_state(tensors["rng/data"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


@dataclass
class Position:
    """Where training continues: ``step`` batches of ``epoch`` (0-based) done, with
    that epoch's running sums so far (loss x images, images, correct, loss terms)."""

    epoch: int
    step: int = 0
    sums: list = field(default_factory=lambda: [0.0, 0, 0, {}])

    @classmethod
    def read(cls, text: str) -> Position:
        """The position a state file's metadata holds; ValueError when it is not one."""
        data = json.loads(text)
        count = lambda v: type(v) is int and v >= 0  # noqa: E731
        number = lambda v: type(v) in (int, float)  # noqa: E731
        if not (isinstance(data, dict) and set(data) <= {"epoch", "step", "sums"} and count(data.get("epoch"))
                and count(data.get("step", 0))):
            raise ValueError(f"position {text[:80]} is not an epoch and a step, counted from 0")
        sums = data.get("sums", [0.0, 0, 0, {}])
        if not (isinstance(sums, list) and len(sums) == 4 and number(sums[0]) and count(sums[1]) and count(sums[2])
                and isinstance(sums[3], dict) and all(number(v) for v in sums[3].values())):
            raise ValueError(f"position sums {json.dumps(sums)[:80]} are not a loss sum, images, correct and terms")
        return cls(data["epoch"], data.get("step", 0), sums)


def check_position(path: Path, position: Position, epochs: int, steps: int) -> None:
    """A state is resumed only at a position within training (``epochs`` epochs of
    ``steps`` batches), or at its very end (saved after the last epoch, before the pair
    was recorded); one past the end is refused, never taken for finished training."""
    if position.epoch < epochs and position.step < steps or (position.epoch, position.step) == (epochs, 0):
        return
    raise UserError(f"{path}: its position (step {position.step} of epoch {position.epoch + 1}) is past the end of "
                    f"training ({epochs} epochs of {steps} steps); delete it to train this pair from the start")


def save_state(path: Path, method: torch.nn.Module, optimizer: torch.optim.Optimizer,
               data_state: torch.Tensor, position: Position, log: list[dict], identity: dict[str, str]) -> None:
    """The state at ``position``; ``data_state`` is the data-order generator's state to
    continue from (at the start of the epoch in flight), ``identity`` names the pair."""
    own, extra = _method_state(method)
    tensors = {f"method/{k}": v for k, v in own.items()}
    opt_tensors, opt_plain = _split_optimizer(optimizer)
    rng_tensors, rng_plain = _rng_state(data_state)
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    try:
        extra_json = json.dumps(extra)
    except TypeError as exc:
        raise ContractError(f"{type(method).__name__}: get_extra_state() must return JSON-able data or tensors "
                            f"({exc})") from None
    metadata = {**identity, "format": FORMAT, "position": json.dumps(asdict(position)), "log": json.dumps(log),
                "extra": extra_json,
                "optimizer": json.dumps(opt_plain), "rng": json.dumps(rng_plain)}
    atomic_save(tensors, path, metadata)


def load_state(path: Path, method: torch.nn.Module, optimizer: torch.optim.Optimizer,
               data_generator: torch.Generator, identity: dict[str, str]) -> tuple[Position, list[dict]] | None:
    """Restore the state in ``path`` when it belongs to this pair (``identity`` and
    format match): returns where to continue and the log so far; None when there is
    no usable state (then training starts from the beginning)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or any(meta.get(k) != v for k, v in identity.items()):
            return None
        tensors = load_file(str(path))
        own = {k.removeprefix("method/"): v for k, v in tensors.items() if k.startswith("method/")}
        expected, _ = _method_state(method)
        if set(own) != set(expected) or any(own[k].shape != expected[k].shape for k in own):
            return None
        own.update(json.loads(meta.get("extra", "{}")))
        position, log = Position.read(meta["position"]), json.loads(meta["log"])
        if not (isinstance(log, list) and len(log) <= position.epoch and all(isinstance(e, dict) for e in log)):
            raise ValueError(f"its log is not a list of at most one entry for each of the {position.epoch} epochs done")
        optimizer_state = _join_optimizer(tensors, json.loads(meta["optimizer"]))
        rng = json.loads(meta["rng"])
        method.load_state_dict(own, strict=False)  # copied onto each tensor's device
        optimizer.load_state_dict(optimizer_state)
        _set_rng_state(tensors, rng, data_generator)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, it is the file's fault
        raise UserError(f"{path}: unreadable training state ({type(exc).__name__}: {exc}); delete it to train this "
                        "pair from the start") from None
    return position, log
