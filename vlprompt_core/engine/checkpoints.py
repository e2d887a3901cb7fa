"""A pair's files: its trained prompts (``checkpoints/<label>-seed<N>-<key>.safetensors``,
the trainable parameters and fitted tensors with what they were trained as) and, beside them while it
trains, its training state (:mod:`~vlprompt_core.trainstate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..api import PromptMethod
from ..errors import UserError
from ..recipes import ResolvedMethod
from ..spec.checks import file_label
from ..trainstate import Position, atomic_save, load_state, save_state
from .optim import divergence, learned_tensors, trainable_parameters


def state_path(checkpoint: Path) -> Path:
    """Where the training state beside a pair's checkpoint goes (:mod:`~vlprompt_core.trainstate`)."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".state.safetensors")


def save_checkpoint(method: PromptMethod, path: Path, metadata: dict[str, str]) -> None:
    """The trainable parameters (fp32) and fitted tensors, as safetensors, with what
    they were trained as."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in learned_tensors(method).items()}
    atomic_save(tensors, path, metadata)


def load_checkpoint(method: PromptMethod, path: Path, expect: dict[str, str]) -> None:
    """Load trained parameters into ``method``, checking that they belong to it: the
    checkpoint's metadata holds every key of ``expect`` (what it must have been trained
    as) with that value; it holds every tensor the method trains, each of its shape,
    finite and not exploded (:func:`~.optim.divergence`)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{path}: not a readable checkpoint ({exc})") from None
    missing = [key for key in expect if key not in meta]
    if missing:
        raise UserError(f"{path}: does not say what it was trained as (no {', '.join(missing)} in its metadata); "
                        "only checkpoints written by 'vlprompt run' can be scored")
    for key in expect:
        if meta[key] != expect[key]:
            raise UserError(f"{path}: trained as {key} {meta[key]}, the spec has {expect[key]}")
    assign_trained(method, tensors, path)


def assign_trained(method: PromptMethod, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy trained ``tensors`` (read from ``path``) into ``method``: exactly the tensors
    it learns (:func:`~.optim.learned_tensors`), each trainable parameter of its shape
    (a fitted tensor takes the saved one's shape), finite, and the trainable ones not exploded
    (:func:`~.optim.divergence`); anything else is a :class:`UserError` naming ``path``."""
    params, learned = trainable_parameters(method), learned_tensors(method)
    fitted = method.fitted_tensors()
    if set(tensors) != set(learned):
        raise UserError(f"{path}: holds {sorted(tensors)}, the method learns {sorted(learned)}")
    for name, p in params.items():
        if tensors[name].shape != p.shape and name not in fitted:
            raise UserError(f"{path}: {name} is {list(tensors[name].shape)}, the method has {list(p.shape)}")
    problem = divergence({name: tensors[name] for name in params})
    problem = problem or next((f"{name} is not finite" for name in learned.keys() - params.keys()
                               if tensors[name].is_floating_point() and not torch.isfinite(tensors[name]).all()), None)
    if problem:
        raise UserError(f"{path}: {problem}; these prompts diverged and cannot be scored (train them again "
                        "with a lower train.lr)")
    for name, p in params.items():
        with torch.no_grad():
            if p.shape == tensors[name].shape:
                p.copy_(tensors[name].to(p.device, p.dtype))
            else:  # a fitted parameter: the saved shape, the same Parameter object
                p.data = tensors[name].to(p.device, p.dtype)
    for name in learned.keys() - params.keys():  # fitted buffers: the saved shape and dtype
        owner, _, attr = name.rpartition(".")
        module = method.get_submodule(owner) if owner else method
        setattr(module, attr, tensors[name].to(learned[name].device))


@dataclass
class PairFiles:
    """Where one (method, seed) pair keeps its prompts and training state, and the
    metadata that ties them to the settings they were trained with."""

    output: Path
    metadata: dict[str, str]  # method, options (JSON), key, label, seed

    @classmethod
    def of(cls, output: Path, m: ResolvedMethod, seed: int) -> PairFiles:
        options = json.dumps(m.describe()["options"], sort_keys=True)
        return cls(output, {"method": m.name, "options": options, "key": m.key, "label": m.label, "seed": str(seed)})

    @property
    def checkpoint(self) -> Path:
        """The checkpoint's path relative to the results folder (as ``results.json`` records it)."""
        meta = self.metadata
        return Path("checkpoints") / f"{file_label(meta['label'])}-seed{meta['seed']}-{meta['key']}.safetensors"

    @property
    def state(self) -> Path:
        return state_path(self.output / self.checkpoint)

    @property
    def identity(self) -> dict[str, str]:
        """What a training state must match to be resumed."""
        return {k: self.metadata[k] for k in ("method", "options", "key", "seed")}

    def save(self, method: PromptMethod, epoch: int) -> None:
        save_checkpoint(method, self.output / self.checkpoint, {**self.metadata, "epoch": str(epoch)})

    def load_into(self, method: PromptMethod, path: Path) -> None:
        """Prompts trained earlier (``vlprompt eval --from``), checked against this pair's
        settings: its method, options and seed."""
        load_checkpoint(method, path, {k: self.metadata[k] for k in ("method", "options", "seed")})

    def save_state(self, method, optimizer, data_state: torch.Tensor, position: Position, log: list[dict]) -> None:
        save_state(self.state, method, optimizer, data_state, position, log, self.identity)

    def resume(self, method, optimizer, generator: torch.Generator) -> tuple[Position, list[dict]] | None:
        """The position and epoch log of an interrupted run of this pair (its state loaded), or None."""
        return load_state(self.state, method, optimizer, generator, self.identity)

    def training_done(self) -> None:
        """The pair is recorded: its training state is no longer needed."""
        self.state.unlink(missing_ok=True)
