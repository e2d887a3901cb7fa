"""What every part of a run shares: where it writes, the device, the feature store,
progress and log lines, the plug-in registry (for fault handling and lifecycle
hooks), the images left out as unreadable, and the processes the run is spread over
(:mod:`.distributed`). Also the small device helpers: seeds, device and precision
resolution, autocast."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import UnreadableImages
from ..errors import UserError
from ..features import FeatureStore
from ..plugins import Registry
from ..settings import device_type, resolve_precision
from . import faults
from .strategy import Strategy


@dataclass
class ProgressReporter:
    """How the engine reports long work (the CLI draws progress bars from it)."""

    start: Callable[[str, int], Any] = lambda desc, total: None
    advance: Callable[[Any, int], None] = lambda task, n=1: None
    stop: Callable[[Any], None] = lambda task: None


@dataclass
class RunContext:
    """One run's surroundings, handed to the loops instead of the engine itself."""

    output: Path
    device: torch.device
    registry: Registry
    features: FeatureStore
    log: Callable[[str], None] = lambda msg: None
    progress: ProgressReporter = field(default_factory=ProgressReporter)
    unreadable: UnreadableImages = field(default_factory=UnreadableImages)  # left out under train.unreadable_images
    #: The processes the run is spread over (:mod:`.distributed`); by default this one alone.
    dist: Strategy = field(default_factory=Strategy)

    def plugin_call(self, kind: str, name: str, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, a plug-in's failure reported as its own (:func:`faults.plugin_call`)."""
        return faults.plugin_call(self.registry, self.output, kind, name, what, call)

    def notify(self, hook: str, **kwargs) -> None:
        """Every implementation of a lifecycle hook (:func:`faults.notify`); ``output_dir`` is added.
        In a distributed run, the main process alone tells them."""
        if not self.dist.is_main:
            return
        faults.notify(self.registry, self.log, hook, output_dir=str(self.output), **kwargs)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(device_type(name))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device: {name!r} asked for, but CUDA is not available")
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast (parameters stay fp32), or nothing for fp32."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
