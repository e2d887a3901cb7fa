"""The method contract: :class:`PromptMethod`, the :class:`Batch` it receives, the
:class:`MethodOutput` it returns and the :class:`ParamGroup` s it trains."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import textbook
from .backbone import VisionLanguageBackbone
from .base import Options
from .data import ClassSet


# -------------------------------------------------------------------------- method


@dataclass
class Batch:
    """One batch as a method receives it.

    The engine fills in what the method's :attr:`PromptMethod.inputs` ask for:
    ``images`` (the augmented pixels ``[B, 3, H, W]``) and/or ``image_features``
    (the frozen backbone's features ``[B, embed_dim]`` of *the same* images,
    computed once without a graph). ``labels`` ``[B]`` are present in training.
    """

    images: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        for t in (self.images, self.image_features, self.labels):
            if t is not None:
                return t.shape[0]
        return 0


@dataclass
class MethodOutput:
    """What a method's forward returns.

    ``logits`` ``[B, C]`` feed the default loss (cross-entropy) and the default
    prediction (arg-max). ``losses`` are extra, already weighted loss terms that
    the default :meth:`PromptMethod.loss` adds; each is logged per epoch by name.
    ``extras`` carry anything else a method's own ``loss``/``predict`` needs (e.g.
    per-sample logits of a stochastic method).
    """

    logits: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParamGroup:
    """Parameters that train with their own settings (see :meth:`PromptMethod.parameter_groups`).

    ``lr_scale`` multiplies the scheduled learning rate; ``weight_decay`` (when not
    ``None``) replaces the run's weight decay for these parameters.
    """

    params: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: float | None = None


INPUTS = ("images", "image_features")


class PromptMethod(nn.Module):
    """A prompt-learning method: trainable prompts around a frozen backbone.

    Implement :meth:`__init__` (build parameters, then call :meth:`set_classes`),
    :meth:`set_classes` and :meth:`forward`. Parameters that require grad are
    exactly what the engine trains and checkpoints; the backbone is frozen before
    the method is built, and its weights must stay bit-identical.

    Optional hooks, each with a default: :meth:`parameter_groups`, :meth:`loss`,
    :meth:`predict`, :meth:`on_epoch_end`. :meth:`cached` keeps image-independent
    results (e.g. static prompt features) for the length of an evaluation.
    """

    #: What :class:`Batch` holds for this method: ``"image_features"`` (the image
    #: tower is not prompted: the engine computes frozen features once, without a
    #: graph, and caches them at evaluation), ``"images"`` (the method runs the
    #: image tower itself, e.g. with visual prompts), or both (e.g. a prompted image
    #: feature regularised towards the frozen one of the same augmented image).
    inputs: ClassVar[tuple[str, ...]] = ("image_features",)
    #: Backbone capabilities the method needs (checked before anything trains), e.g.
    #: ``("vision_transformer",)`` for visual prompts.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Whether the text features depend on the image (instance-conditional prompts,
    #: e.g. CoCoOp). Only :mod:`~vlprompt_core.textbook` mode reads it: it calls such
    #: a method one image at a time, as the reference code loops over a batch.
    per_image_text: ClassVar[bool] = False

    def __init__(self, backbone: VisionLanguageBackbone, classes: ClassSet, options: Options):
        super().__init__()
        self.backbone = backbone
        self.options = options
        self._cache: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        bad = set(cls.inputs) - set(INPUTS)
        if not cls.inputs or bad:
            raise TypeError(f"{cls.__name__}.inputs must be a non-empty subset of {INPUTS}, got {cls.inputs}")
        if "set_classes" in cls.__dict__:  # a new class set never sees the old one's cache
            own = cls.__dict__["set_classes"]

            @functools.wraps(own)
            def set_classes(self, classes, _own=own):
                self._cache.clear()
                return _own(self, classes)

            cls.set_classes = set_classes

    # ------------------------------------------------------------- required
    def set_classes(self, classes: ClassSet) -> None:
        """Rebuild class-dependent state for ``classes`` (novel classes, transfer
        targets). A method that cannot score other classes raises a one-line
        :class:`~vlprompt_core.errors.UserError` saying why."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> MethodOutput:
        """Scores of ``batch`` against the current classes."""
        raise NotImplementedError

    # ------------------------------------------------------- optional hooks
    def parameter_groups(self) -> list[ParamGroup]:
        """How the trainable parameters are optimised. Default: one group, the run's
        settings. Every trainable parameter must be in exactly one group."""
        return [ParamGroup([p for p in self.parameters() if p.requires_grad])]

    def loss(self, output: MethodOutput, batch: Batch) -> torch.Tensor:
        """The training loss. Default: cross-entropy of ``output.logits`` against
        ``batch.labels`` plus every term in ``output.losses``."""
        loss = F.cross_entropy(output.logits.float(), batch.labels)
        for extra in output.losses.values():
            loss = loss + extra.float()
        return loss

    def predict(self, output: MethodOutput) -> torch.Tensor:
        """Class scores ``[B, C]`` whose arg-max is the prediction. Default: the logits."""
        return output.logits

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called after each training epoch (0-based ``epoch`` of ``epochs``), after the
        optimiser's last step of the epoch. Default: nothing."""

    # --------------------------------------------------------------- helpers
    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` in training mode; in eval mode computed once and kept until
        the next :meth:`train` or :meth:`set_classes` (e.g. static text features,
        once per evaluation instead of once per test batch); computed every time in
        :mod:`~vlprompt_core.textbook` mode."""
        if self.training or textbook.active():
            return compute()
        if key not in self._cache:
            value = compute()
            self._cache[key] = value.detach() if isinstance(value, torch.Tensor) else value
        return self._cache[key]

    def train(self, mode: bool = True):
        self._cache.clear()
        return super().train(mode)
