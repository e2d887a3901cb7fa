"""What plug-ins implement and return: the public contract of vlprompt.

Reading order for a method author: :class:`Options`, :class:`PromptMethod` (with
:class:`Batch` and :class:`MethodOutput`), :class:`MethodEntry` and
:class:`~vlprompt_core.recipes.Recipe`. The backbone interface a method may use is
:class:`VisionLanguageBackbone`; the shared text-prompt machinery is in
:mod:`vlprompt_core.prompting`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from . import textbook

if TYPE_CHECKING:
    from .recipes import Recipe


class Options(BaseModel):
    """Base of every plug-in's options model: unknown keys are errors, not ignored,
    and so are infinite or NaN floats."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ContractError(RuntimeError):
    """A plug-in broke the contract it signed (e.g. a text block hook changed the
    sequence length). A bug in the plug-in, not a mistake of the user."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Item:
    """One labelled image on disk."""

    path: Path
    label: int


@dataclass(frozen=True)
class ClassSet:
    """The classes a classifier is built for: canonical names and prompt templates.

    ``templates`` are the dataset's own hand-written prompt(s), the first one being
    *the* zero-shot prompt; ``ensemble`` is the prompt ensemble the literature uses
    for this dataset (``None``: the dataset's templates plus
    :data:`~vlprompt_core.prompting.ENSEMBLE_TEMPLATES`); see
    :func:`~vlprompt_core.prompting.templates_for`.
    """

    names: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    ensemble: list[str] | None = None

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class DatasetSplits:
    """A loaded dataset: canonical classes (index = label) and its splits."""

    name: str
    classes: ClassSet
    train: list[Item]
    val: list[Item]
    test: list[Item]


@dataclass
class EvalSet:
    """A split scored under its own classifier (e.g. the novel classes only)."""

    name: str
    items: list[Item]
    classes: ClassSet


@dataclass
class Plan:
    """What a protocol decided for one seed: what trains and what is scored."""

    train: list[Item]
    val: list[Item]
    classes: ClassSet
    evals: list[EvalSet]
    #: The few-shot items drawn for this seed, JSON-able; saved as ``fewshot/seed<N>.json``.
    sample: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------ backbone

#: A function called before block ``l`` of a tower with the tokens ``x`` ``[N, L, W]``
#: entering it; it returns the tokens the block gets instead (see
#: :meth:`VisionLanguageBackbone.encode_text_embeddings` for what may change).
BlockHook = Callable[[int, torch.Tensor], torch.Tensor]

#: What a shared causal text prefix leaves behind for the tokens after it
#: (:meth:`VisionLanguageBackbone.encode_text_prefix`): one ``(keys, values)`` pair per
#: text block, each ``[G, heads, P, head_dim]`` for G prefixes of P tokens. Row g
#: belongs to prefix g, so indexing both tensors of every pair selects prefixes.
TextPrefix = list[tuple[torch.Tensor, torch.Tensor]]


class VisionLanguageBackbone(nn.Module):
    """A frozen CLIP-like model, seen through the parts prompt methods need.

    **Text tower.** ``tokenize`` / ``tokenize_words`` -> ``embed_tokens`` -> (edit the
    embeddings, e.g. write context vectors into slots) -> ``encode_text_embeddings``,
    which adds positions, runs the blocks (with an optional hook before each, for deep
    text prompts), and applies the text head: final norm, the state at
    ``pool_positions(tokens)``, projection (:meth:`text_head`).

    **Image tower** (ViT backbones, ``"vision_transformer" in capabilities``):
    ``embed_image(images, pre_norm=False)`` gives class + patch tokens with positions
    *before* the pre-norm (insert tokens here to have them normalised, as MaPLe
    does); ``vision_pre_norm`` applies it; ``embed_image(images)`` is both steps
    (insert here to skip the norm, as ProVP and VPT do). ``encode_image_tokens``
    runs the blocks (hook before each) and the image head (:meth:`image_head`:
    pooling at the class token, final norm, projection). ``encode_image`` is the
    whole frozen path and equals the model's own image encoder.

    Widths and depths are attributes read from the model. The backbone is frozen
    and stays in eval mode whatever its parent module does.
    """

    embed_dim: int
    text_width: int
    text_depth: int
    vision_width: int
    vision_depth: int
    context_length: int
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    #: ``logit_scale.exp()``, a plain float (frozen).
    logit_scale: float
    sot_id: int
    eot_id: int
    #: What this backbone offers beyond features: ``"vision_transformer"`` when the
    #: image tower is a ViT whose tokens and blocks are reachable (visual prompts).
    capabilities: frozenset[str] = frozenset()
    #: A short description for messages, e.g. ``"ViT-B-16 (open_clip)"``.
    description: str = ""
    #: Whether :meth:`encode_text_prefix` and :meth:`encode_text_suffix` work: the text
    #: tower is causal and pools at a token after the prefix, so prompts that begin with
    #: the same tokens can share one pass over them (a CoOp prompt table runs its start
    #: token and context once, not once per class).
    text_prefix_sharing: bool = False

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` with start/end tokens, zero-padded."""
        raise NotImplementedError

    def tokenize_words(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        raise NotImplementedError

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen token embeddings ``[..., text_width]`` of ``tokens``."""
        raise NotImplementedError

    #: ``[context_length, text_width]`` text positional embedding.
    positional_embedding: torch.Tensor

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text pooling rule: index ``[N]`` of the token whose final state is the
        text feature of each sequence (e.g. the end token for CLIP)."""
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen text features ``[N, embed_dim]`` of token ids (not normalised)."""
        raise NotImplementedError

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        block_hook: BlockHook | None = None,
        add_positional: bool = True,
    ) -> torch.Tensor:
        """Text features ``[N, embed_dim]`` from token embeddings ``[N, L, text_width]``.

        ``tokens`` ``[N, L]`` are the ids the embeddings stand for; they decide the
        pooled position. ``block_hook(l, x)`` is called before block ``l`` and may
        replace token states but must keep the shape (a different shape raises
        :class:`ContractError`): pooling reads positions from ``tokens``. The tower is
        causal, so sequences may be cut after the last pooled position before the
        blocks run; hooks see that length.
        """
        raise NotImplementedError

    def text_head(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm, the state at ``pool_positions(tokens)``, projection: ``[N, embed_dim]``."""
        raise NotImplementedError

    def encode_text_prefix(self, prefix: torch.Tensor) -> TextPrefix:
        """Run the text blocks over G shared prompt beginnings ``prefix``
        ``[G, P, text_width]`` (token embeddings with positions): what each block's
        attention needs of them for the tokens that follow (see :data:`TextPrefix`).
        Only with :attr:`text_prefix_sharing`."""
        raise NotImplementedError

    def encode_text_suffix(self, prefix: TextPrefix, suffix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text features ``[G, C, embed_dim]`` of the prompts that begin with prefix g
        (:meth:`encode_text_prefix`, P tokens) and continue with ``suffix[g, c]``
        ``[G, C, S, text_width]`` (token embeddings with positions P, P+1, ...).

        ``tokens`` ``[C, >= P]`` are the ids of the whole prompts (prefix included);
        they decide the pooled positions, which must lie in the suffix. The features
        equal :meth:`encode_text_embeddings` of the whole prompts, up to rounding, and
        so do the gradients. Only with :attr:`text_prefix_sharing`.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- vision
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen image features ``[B, embed_dim]`` (not normalised)."""
        raise NotImplementedError

    def embed_image(self, images: torch.Tensor, pre_norm: bool = True) -> torch.Tensor:
        """Class token then patch tokens, with positions: ``[B, 1 + P, vision_width]``;
        after the pre-norm unless ``pre_norm=False``."""
        raise NotImplementedError

    def vision_pre_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The norm applied to the image tokens before the first block."""
        raise NotImplementedError

    def encode_image_tokens(self, tokens: torch.Tensor, block_hook: BlockHook | None = None) -> torch.Tensor:
        """Run the image blocks on ``tokens`` ``[B, T, vision_width]`` and the image head.

        ``block_hook(l, x)`` is called before block ``l``; it may insert, replace or
        remove tokens (the sequence length may change) but must keep the class token
        at index 0, the batch size and the width (a different batch size or width
        raises :class:`ContractError`).
        """
        raise NotImplementedError

    def image_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooling at the class token, final norm, projection: ``[B, embed_dim]``."""
        raise NotImplementedError

    def require(self, capability: str, who: str) -> None:
        """Raise a one-line :class:`~vlprompt_core.errors.UserError` naming ``who``
        unless this backbone has ``capability``."""
        from .errors import UserError

        if capability not in self.capabilities:
            what = {"vision_transformer": "a ViT image tower (visual prompts go into its blocks)"}.get(
                capability, capability
            )
            raise UserError(f"{who} needs {what}; backbone {self.description or type(self).__name__} has none")


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


# ------------------------------------------------------------------- registrations


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone: its options model and a builder.

    ``check(options)`` (optional) returns one line per problem it finds without
    loading weights (unknown model name, missing checkpoint file...); it runs for
    ``vlprompt validate`` and before every run.
    """

    name: str
    options: type[Options]
    build: Callable[[Any], VisionLanguageBackbone]
    description: str = ""
    check: Callable[[Any], list[str]] | None = None


@dataclass(frozen=True)
class Published:
    """A result the method's authors published, shown beside measured ones by
    ``vlprompt report --paper``: ``metrics`` in %, named as the protocol summarises
    them (few_shot: accuracy; base2novel: base, novel, H), for one dataset."""

    protocol: str
    dataset: str
    metrics: dict[str, float]
    shots: int | None = None
    backbone: str = "ViT-B/16"
    source: str = ""

    @classmethod
    def load(cls, package: str, resource: str = "published.yaml") -> tuple[Published, ...]:
        """The published results in a data file shipped inside ``package`` (see
        ``docs/reports.md``): ``tables``, each with ``source``, ``protocol``, ``shots``,
        ``backbone`` and ``results: {dataset: {metric: value}}``."""
        import importlib.resources

        import yaml

        data = yaml.safe_load(importlib.resources.files(package).joinpath(resource).read_text())
        return tuple(
            cls(table["protocol"], dataset, {m: float(v) for m, v in metrics.items()}, table.get("shots"),
                table.get("backbone", "ViT-B/16"), table.get("source", ""))
            for table in data["tables"]
            for dataset, metrics in table["results"].items()
        )


@dataclass(frozen=True)
class MethodEntry:
    """A method: its options model, the module class built from them, its training
    recipe (:class:`~vlprompt_core.recipes.Recipe`, as the authors trained it) and the
    results its authors published (:class:`Published`)."""

    name: str
    options: type[Options]
    build: Callable[[VisionLanguageBackbone, ClassSet, Any], PromptMethod]
    description: str = ""
    recipe: Recipe | None = None
    published: tuple[Published, ...] = ()


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset: options model and loader; ``check(options)`` (optional) lists
    problems found cheaply (missing folders, unreadable split files)."""

    name: str
    options: type[Options]
    load: Callable[[Any], DatasetSplits]
    description: str = ""
    check: Callable[[Any], list[str]] | None = None


@dataclass
class ProtocolContext:
    """What a protocol gets to make its plan for one seed."""

    dataset: DatasetSplits
    seed: int
    #: Loads another dataset section of the spec (targets of transfer protocols).
    load_dataset: Callable[[Any], DatasetSplits]


@dataclass(frozen=True)
class ProtocolEntry:
    """A protocol: plans what trains and what is scored, and summarises scores.

    ``summarize`` maps ``{eval set name: accuracy}`` to the headline metrics
    (e.g. Base, Novel, H), in display order.
    """

    name: str
    options: type[Options]
    plan: Callable[[Any, ProtocolContext], Plan]
    summarize: Callable[[Any, dict[str, float]], dict[str, float]]
    description: str = ""


@dataclass(frozen=True)
class LoggerEntry:
    """A logger: its name and options model, nothing else.

    A spec enables it with a section in ``loggers:`` (``{name: <this name>, ...options}``,
    validated against ``options``). What it does it does through the lifecycle hooks
    (``vlprompt_run_start`` ... ``vlprompt_run_end``): ``vlprompt_run_start`` gets the
    resolved spec, whose ``loggers`` list says whether (and how) it is enabled for the run.
    """

    name: str
    options: type[Options]
    description: str = ""


class DatasetRef(dict):
    """Annotate a protocol option as ``list[DatasetRef]`` to take dataset sections.

    The run spec validates each entry like the top-level ``dataset`` section (any
    registered dataset with its own options), e.g. the targets of cross-dataset
    transfer; the protocol then receives validated sections.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        return handler.generate_schema(dict[str, Any])
