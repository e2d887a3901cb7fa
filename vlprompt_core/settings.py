"""Training settings as plain data: the spec's ``train:`` section (:class:`TrainSpec`)
and a method section's overrides of it (:class:`TrainOverride`).

A leaf of the core: it imports pydantic and torch, nothing of vlprompt, so the
recipes, the spec and the engine all build on it.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Optional, Union

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator
from pydantic_core import PydanticCustomError

__all__ = ["Folder", "TrainOverride", "TrainSpec", "device_type", "folder", "resolve_precision"]


def folder(value: Any) -> Any:
    """A folder as a spec writes it (``output``, ``train.feature_cache``): a leading
    ``~`` is the home folder, as in dataset paths. Empty text (it would be the current
    folder) and an environment variable (``$HOME``, ``${SCRATCH}``: not expanded, it
    would make a folder of that very name) are refused."""
    if not isinstance(value, (str, PurePath)):
        return value
    text = str(value)
    if not text.strip():
        raise PydanticCustomError("empty_folder", "empty: give a folder, or leave the setting out for its default")
    variable = re.search(r"\$(\w+|\{[^}]*\})", text)
    if variable:
        raise PydanticCustomError(
            "environment_variable", "{value} holds {variable}, an environment variable, which vlprompt does not "
            "expand: write the folder out (a leading ~ is your home folder)",
            {"value": repr(text), "variable": variable.group(0)})
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~user of an unknown user: the folder as written
        return Path(text)


#: A folder a spec names (:func:`folder`).
Folder = Annotated[Path, BeforeValidator(folder)]


class TrainSpec(BaseModel):
    """How prompts are trained: the ``train:`` section. Its defaults (the CoOp
    reference recipe) apply to what neither the spec nor a method's recipe sets.

    Numbers are bounded above where a larger value could only exhaust memory or
    never finish, and floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(10, ge=0, le=10_000, description="training epochs (0: evaluate only)")
    batch_size: int = Field(32, ge=1, le=65_536)
    eval_batch_size: int = Field(256, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="sgd (momentum, L2 weight decay), adam (torch.optim.Adam: L2 weight decay added to the "
        "gradient, as Dassl's 'adam') or adamw (decoupled weight decay); betas 0.9, 0.999")
    lr: float = Field(0.002, gt=0)
    momentum: float = Field(0.9, ge=0, description="SGD momentum (adam and adamw ignore it)")
    weight_decay: float = Field(5e-4, ge=0)
    adam_eps: float = Field(
        1e-8, gt=0, description="eps of adam and adamw, added to the root of the second moment (sgd ignores it)")
    schedule: Literal["cosine", "constant"] = "cosine"
    schedule_per: Literal["epoch", "step"] = Field(
        "epoch", description="cosine stepped once per epoch (Dassl), or before every optimiser step with T_max = "
        "the steps after warm-up (torch's CosineAnnealingLR stepped per iteration)")
    min_lr: float = Field(0.0, ge=0, description="the cosine's floor (eta_min)")
    steps: Optional[int] = Field(
        None, ge=1, le=10_000_000, description="a budget of optimiser steps instead of epochs: as many epochs as "
        "it takes, the last one cut short (e.g. CLIP-LoRA's 500 x shots iterations); the cosine then spans these "
        "steps. A recipe's steps give way to epochs written in the spec")
    warmup_epochs: int = Field(1, ge=0, le=10_000, description="epochs at warmup_lr before the schedule starts")
    warmup_lr: float = Field(1e-5, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast dtype; trainable parameters stay fp32. auto: bf16 on CUDA, fp32 on CPU"
    )
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="area range of the random resized crop (reference: 0.08-1)"
    )
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(
        default_factory=lambda: [1, 2, 3], min_length=1, max_length=1000)
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    num_workers: int = Field(0, ge=0, le=256, description="data-loading worker processes")
    kernels: Literal["auto", "reference", "triton"] | None = Field(
        None, description="backend of the fused ops: 'triton' (CUDA), 'reference' (PyTorch) or 'auto'; "
        "default: $VLPROMPT_KERNELS, else auto")
    augment_views: int = Field(
        0, ge=0, le=1000, description="K > 0: an approximation for methods that read only frozen image features "
        "(CoOp, CoCoOp...): K augmented views of each training image go through the frozen image tower once, and "
        "every epoch samples one of them per image; 0: a fresh augmentation every step (exact)")
    text_chunk: Union[int, Literal["auto"]] = Field(
        "auto", description="prompts per text-tower pass, recomputed in the backward pass (bounded memory for "
        "many classes, same gradients); 0: one pass; auto: passes of about 1 GiB of activations")
    checkpoint_every: int = Field(
        0, ge=0, le=10**9, description="also save the training state every N steps, not only at the end of each "
        "epoch (a run stopped mid-epoch resumes there; exactly so with num_workers: 0)")
    feature_cache: Optional[Folder] = Field(
        None, description="folder of frozen image features kept between runs (test splits and augmented views), "
        "keyed by backbone weights, images, transform and precision; share it between the runs of a sweep")
    unreadable_images: Literal["error", "skip"] = Field(
        "error", description="an image file that cannot be read: 'error' stops the run naming the file; "
        "'skip' leaves it out and counts it in results.json (unreadable_images)"
    )

    @field_validator("text_chunk")
    @classmethod
    def _chunk(cls, value):
        if isinstance(value, int) and not 0 <= value <= 1_000_000:
            raise ValueError("needs a number of prompts from 1 to 1,000,000, 0 (one pass) or 'auto'")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        repeated = sorted({s for s in value if value.count(s) > 1})
        if repeated:
            raise ValueError(f"seed{'s' * (len(repeated) > 1)} {', '.join(map(str, repeated))} listed more than once: "
                             "each seed is one run of every method (a repeat would count one result as several), "
                             "list each seed once")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ValueError("needs 'auto', 'cpu', 'cuda', 'cuda:1' or another torch device name") from None
        return value

    @field_validator("crop_scale")
    @classmethod
    def _ordered_fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("needs 0 < low <= high <= 1")
        return value


#: Per-method overrides of the train section (every field optional).
TrainOverride = create_model(
    "TrainOverride",
    __config__=ConfigDict(extra="forbid"),
    **{
        name: (Optional[field.annotation], Field(None, description=field.description))
        for name, field in TrainSpec.model_fields.items()
        if name not in ("seeds", "device", "num_workers", "kernels", "unreadable_images", "feature_cache",
                        "checkpoint_every")
    },
)


def device_type(device: str) -> str:
    """The kind of device ``train.device`` names (``cuda``, ``cpu``, ...); ``auto``:
    CUDA when available. Not checked against the machine (the engine does that)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """``auto``: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision
