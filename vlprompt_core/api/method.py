"""The method contract: :class:`PromptMethod`, the :class:`Batch` it receives, the
:class:`MethodOutput` it returns, the :class:`ParamGroup` s it trains and the
:class:`FrozenData` it may fit from without gradient steps."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import textbook
from .backbone import VisionLanguageBackbone
from .base import BackboneInfo, Options
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

    A method that :attr:`~PromptMethod.provides` ``"features"`` puts there
    :data:`TEXT_FEATURES` ``[C, D]`` and :data:`IMAGE_FEATURES` ``[B, D]``: the
    features, before normalisation, whose scaled cosine similarity its ``logits`` are
    (a method wrapping it, e.g. DePT's head, works on them).
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


@dataclass
class FrozenFeatures:
    """Frozen image features of one split: ``features`` raw (not normalised) fp32,
    ``[N, D]``, or ``[K, N, D]`` for K augmented views; ``labels`` ``[N]``."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


class FrozenData:
    """What :meth:`PromptMethod.before_training` and :meth:`~PromptMethod.after_training`
    may fit from: the frozen image features of the plan's training split and of its
    validation split, on the run's device. A test split is out of reach by design:
    whatever a method fits or searches (a cache, a classifier, hyper-parameters) never
    sees what it is scored on.

    The engine computes them once per run (and keeps them in the feature cache);
    :func:`vlprompt_core.testing.synthetic_frozen_data` makes one for unit tests.
    """

    #: The training classes (the plan's: the base classes in base-to-novel).
    classes: ClassSet

    def train(self, views: int = 0) -> FrozenFeatures:
        """The training images: ``views=0`` one view each under the test transform
        (resize, centre crop), ``[N, D]``; ``views=K`` K augmented views each under the
        run's training transform (``train.crop_scale``, flips), ``[K, N, D]``, drawn as
        ``train.augment_views`` draws them."""
        raise NotImplementedError

    def val(self) -> FrozenFeatures:
        """The validation images (few-shot: ``min(shots, 4)`` per class) under the test
        transform, ``[N, D]``; ``N`` may be 0 (a plan without validation items)."""
        raise NotImplementedError


INPUTS = ("images", "image_features")
#: :attr:`MethodOutput.extras` keys of a method that provides ``"features"``.
TEXT_FEATURES, IMAGE_FEATURES = "text_features", "image_features"


@dataclass(frozen=True)
class EffectiveOptions:
    """What :meth:`PromptMethod.effective_options` returns: the ``options`` the method
    uses (the same options model), and ``notes``, one line each, saying why a value
    differs from what the spec or recipe asked for (e.g. ``prompt_depth 9 -> 4: the
    image tower has 4 blocks``)."""

    options: Options
    notes: tuple[str, ...] = ()


class PromptMethod(nn.Module):
    """A prompt-learning method: trainable prompts around a frozen backbone.

    Implement :meth:`__init__` (build parameters, then call :meth:`set_classes`),
    :meth:`set_classes` and :meth:`forward`. Parameters that require grad are
    exactly what the engine trains and checkpoints; the backbone is frozen before
    the method is built, and its weights must stay bit-identical.

    Optional hooks, each with a default: :meth:`parameter_groups`, :meth:`loss`,
    :meth:`backward`, :meth:`predict`, :meth:`on_epoch_end`; around the gradient steps,
    :meth:`before_training` and :meth:`after_training` (fit from frozen features, search
    hyper-parameters on the validation split: what they fit is registered with
    :meth:`register_fitted` and checkpointed beside the trainable parameters); before
    anything is built,
    :meth:`effective_options` (the settings the method actually uses on a backbone,
    and conflicts told early). :meth:`cached` keeps image-independent results (e.g.
    static prompt features) for the length of an evaluation.

    ``self.backbone`` is the shared frozen backbone, kept *outside* the module tree:
    :meth:`parameters`, :meth:`state_dict`, :meth:`apply`, :meth:`half`, :meth:`to`
    and :meth:`train` of the method never reach it (the engine places it and keeps it
    frozen and in eval mode). Keep it there only: a submodule of the method that holds
    it would bring it back into the tree.
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
    #: Whether a distributed run may shard this method's text pass over classes (each
    #: process encodes a slice of the classes, the features gathered with their
    #: gradient; :mod:`~vlprompt_core.prompting.sharding`): set it when the text features
    #: of a training step are the same for every image of the batch (one context for all
    #: images, as CoOp's) and come from
    #: :meth:`~vlprompt_core.prompting.PromptTable.encode` (which shards by itself) or
    #: :func:`~vlprompt_core.prompting.shard_classes`. Default: every process encodes
    #: every class (plain data parallel), which is always correct.
    shards_classes: ClassVar[bool] = False
    #: What a method wrapping this one may rely on (see
    #: :class:`~vlprompt_core.api.MethodRef`): ``"features"``, its forward puts the text
    #: and image features its logits are the scaled cosine of into
    #: :attr:`MethodOutput.extras` (:data:`TEXT_FEATURES`, :data:`IMAGE_FEATURES`).
    provides: ClassVar[tuple[str, ...]] = ()
    #: For a method that wraps another: what the wrapped one must provide
    #: (:attr:`provides`); another is refused before anything is built.
    needs_of_wrapped: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: VisionLanguageBackbone, classes: ClassSet, options: Options):
        super().__init__()
        self.backbone = backbone
        self.options = options
        self._cache: dict[str, Any] = {}
        self._fitted: list[str] = []

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "backbone":  # a plain attribute, never a submodule (see the class docstring)
            modules = self.__dict__.get("_modules")
            if modules is not None:
                modules.pop(name, None)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

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
    @classmethod
    def effective_options(cls, options: Options, backbone: BackboneInfo) -> EffectiveOptions:
        """The settings this method actually uses with ``options`` on ``backbone``,
        told before anything is built (no weights: every field of ``backbone`` may be
        None, then keep what was asked for). E.g. a prompt depth clamped to a shallower
        tower, or the context length that ``ctx_init`` makes.

        ``vlprompt validate`` and a run print it; the engine calls it again with what
        the built backbone says, builds the method with the options it returns and
        records them in ``results.json``. Options conflicting with the backbone that
        can be told here raise a :class:`~vlprompt_core.errors.UserError`, one line per
        conflict (``options.model_fields_set`` tells what the spec or recipe wrote).
        Default: the options as given. Return ``options.model_copy(update={...})``,
        not a new model."""
        return EffectiveOptions(options)

    @classmethod
    def fixed_classes(cls, options: Options) -> str | None:
        """Why this method, with ``options``, scores only the classes it was trained or
        fitted on (and subsets of them), in one line; None (the default) when it scores
        any class names. Told before anything is built: ``vlprompt validate`` refuses it
        under a protocol that scores unseen classes (base-to-novel), ``method: all``
        leaves it out there, and its :meth:`set_classes` raises the same line as a
        :class:`~vlprompt_core.errors.UserError` for names it cannot score (e.g. a
        transfer target's), which fails that pair alone."""
        return None

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

    def backward(self, loss: torch.Tensor, output: MethodOutput, batch: Batch) -> None:
        """Fill the ``.grad`` of the trainable parameters for one training step. Default:
        ``loss.backward()``.

        The engine calls it after :meth:`loss` (``loss`` is what it returned: checked
        finite, and what the epoch's log averages), with the gradients zeroed, outside
        autocast, and steps the optimiser right after: override it to shape the gradients a step follows (project
        one term's gradient against another's, weight or clip them). A parameter left
        without a ``.grad`` does not move in this step (weight decay included)."""
        loss.backward()

    def predict(self, output: MethodOutput) -> torch.Tensor:
        """Class scores ``[B, C]`` whose arg-max is the prediction. Default: the logits."""
        return output.logits

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called after each training epoch (0-based ``epoch`` of ``epochs``), after the
        optimiser's last step of the epoch. Default: nothing."""

    def before_training(self, data: FrozenData) -> None:
        """Fit what comes from the training data without the engine's gradient steps: a
        cache of training features (Tip-Adapter), a closed-form or searched classifier
        (a linear probe), an initialisation from class means, or a method's own
        full-batch optimisation. Keep the result in fitted tensors (:meth:`register_fitted`)
        or in trainable parameters (their starting point). Default: nothing.

        The engine calls it when the method has trainable parameters or fitted tensors:
        after ``set_classes(data.classes)``, before its gradient steps (if any: trainable
        parameters and ``train.epochs > 0``), in eval mode, autograd enabled. A run that
        resumes after a kill calls it again with the same data and seed: keep it
        deterministic given torch's seed."""

    def after_training(self, data: FrozenData) -> None:
        """After the engine's gradient steps (right after :meth:`before_training` when
        there are none), in eval mode: e.g. search hyper-parameters on ``data.val()``.
        The checkpoint is written after it. Default: nothing."""

    # --------------------------------------------------------------- helpers
    def register_fitted(self, name: str, tensor: torch.Tensor) -> None:
        """Register state that :meth:`before_training` / :meth:`after_training` fit:
        ``tensor`` is a placeholder of any shape (e.g. ``torch.empty(0)``); set the fitted
        value by plain assignment, ``self.<name> = value`` (for a parameter,
        ``self.<name>.data = value``, keeping the object the optimiser holds).

        A tensor becomes a buffer; an ``nn.Parameter`` stays a parameter, one whose
        shape only fitting knows, e.g. Tip-Adapter-F's cache keys, initialised from the
        training features and then trained. Fitted tensors are saved in the checkpoint
        beside the trainable parameters and restored whenever the prompts are scored or
        loaded again, with the shape they were saved with."""
        if isinstance(tensor, nn.Parameter):
            self.register_parameter(name, tensor)
        else:
            self.register_buffer(name, tensor)
        if name not in self._fitted:
            self._fitted.append(name)

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        """Every fitted tensor (:meth:`register_fitted`) of this method and of the methods
        it wraps, by its name in :meth:`state_dict`."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in self.named_modules():
            if isinstance(module, PromptMethod):
                for name in module._fitted:
                    out[f"{prefix}.{name}" if prefix else name] = getattr(module, name)
        return out

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
