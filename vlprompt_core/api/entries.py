"""What the registration hooks return: one entry per backbone, method, dataset,
protocol and logger, the :class:`Published` results of a method, what a protocol
plans with (:class:`ProtocolContext`) and :class:`DatasetRef` for dataset options."""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import Field, create_model

from ..errors import UserError
from ..yamlload import load as load_yaml
from .backbone import VisionLanguageBackbone
from .base import BackboneInfo, ContractError, Options
from .data import ClassSet, DatasetSplits, Plan
from .method import EffectiveOptions, PromptMethod
from .recipe import Recipe


# ------------------------------------------------------------------- registrations


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone: its options model and a builder.

    ``check(options)`` (optional) returns one line per problem it finds without
    loading weights (unknown model name, missing checkpoint file...); it runs for
    ``vlprompt validate`` and before every run.

    ``text_context(options)`` (optional) tells, without loading weights, ``(count,
    context_length)``: ``count(text)`` the tokens of a text with the start and end
    tokens, ``context_length`` the most the text tower takes; or None where that cannot
    be told cheaply. ``vlprompt validate`` checks the datasets' prompts with it.

    ``info(options)`` (optional) tells, without loading weights, what the backbone is
    (:class:`BackboneInfo`: family, depths, widths...), or None; recipe rules match it
    and methods settle their options on it (:meth:`MethodEntry.effective`) for
    ``vlprompt validate`` and before a run.
    """

    name: str
    options: type[Options]
    build: Callable[[Any], VisionLanguageBackbone]
    description: str = ""
    check: Callable[[Any], list[str]] | None = None
    text_context: Callable[[Any], tuple[Callable[[str], int], int] | None] | None = None
    info: Callable[[Any], BackboneInfo | None] | None = None


#: The ``dataset`` of a :class:`Published` average over several datasets.
AVERAGE = "average"


@dataclass(frozen=True)
class Published:
    """A result the method's authors published, shown beside measured ones by
    ``vlprompt report --paper``: ``metrics`` in %, named as the protocol summarises
    them (few_shot: accuracy; base2novel: base, novel, H), for one dataset; or, made
    by :meth:`average`, the paper's average over the datasets ``over`` (e.g. MaPLe's
    base-to-novel H 78.55 over 11 datasets), shown in a report's average cells when the
    measured datasets are those."""

    protocol: str
    dataset: str
    metrics: dict[str, float]
    shots: int | None = None
    backbone: str = "ViT-B/16"
    source: str = ""
    over: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.dataset == AVERAGE) != bool(self.over):
            raise ContractError(f"Published({self.protocol!r}, {self.dataset!r}): an average names the datasets it "
                                "is over (Published.average), and only an average does")

    @classmethod
    def average(cls, protocol: str, datasets, metrics: dict[str, float], shots: int | None = None,
                backbone: str = "ViT-B/16", source: str = "") -> Published:
        """A paper's average over ``datasets`` (their vlprompt names), as the paper
        computes it (base-to-novel: H of the average base and novel)."""
        over = tuple(sorted(set(datasets)))
        if not over:
            raise ContractError(f"Published.average({protocol!r}): no datasets to average over")
        return cls(protocol, AVERAGE, dict(metrics), shots, backbone, source, over)

    @classmethod
    def load(cls, package: str, resource: str = "published.yaml") -> tuple[Published, ...]:
        """The published results in a data file shipped inside ``package`` (see
        ``docs/reports.md``): ``tables``, each with ``source``, ``protocol``, ``shots``,
        ``backbone`` and ``results: {dataset: {metric: value}}``; optionally
        ``average: {metric: value}``, the paper's average over ``average_over`` (a list
        of dataset names; default: the datasets under ``results``)."""
        data = load_yaml(importlib.resources.files(package).joinpath(resource).read_text())
        out = []
        for table in data["tables"]:
            common = dict(shots=table.get("shots"), backbone=table.get("backbone", "ViT-B/16"),
                          source=table.get("source", ""))
            results = table.get("results") or {}
            out += [cls(table["protocol"], dataset, {m: float(v) for m, v in metrics.items()}, **common)
                    for dataset, metrics in results.items()]
            if "average" in table:
                over = table.get("average_over", list(results))
                out.append(cls.average(table["protocol"], over, {m: float(v) for m, v in table["average"].items()},
                                       **common))
        return tuple(out)


@dataclass(frozen=True)
class MethodEntry:
    """A method: its options model, the module class built from them, its training
    recipe (:class:`~vlprompt_core.recipes.Recipe`, as the authors trained it) and the
    results its authors published (:class:`Published`).

    ``trains``: False for a method that is only scored, never trained (it has no
    trainable parameters, e.g. zero-shot CLIP). Its results are then keyed without the
    train settings that only training reads (epochs, lr, batch size, ...; see
    :func:`~vlprompt_core.recipes.method_key`), so that runs of it under different
    training settings count as the same (method, seed) pairs.

    A method that wraps another types an option :class:`MethodRef`; the registry then
    fills in ``wraps`` and ``bases`` (:func:`compose_methods`). Build methods with
    :meth:`make`, which builds the wrapped ones first."""

    name: str
    options: type[Options]
    build: Callable[..., PromptMethod]
    description: str = ""
    recipe: Recipe | None = None
    published: tuple[Published, ...] = ()
    trains: bool = True
    #: Set by the core, never by a plug-in: the option fields typed :class:`MethodRef`
    #: (the methods this one wraps), and the entries such a field may name.
    wraps: tuple[str, ...] = ()
    bases: dict[str, MethodEntry] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def effective(self, options: Any, backbone: BackboneInfo) -> EffectiveOptions:
        """The options the method uses on ``backbone``: its class's
        :meth:`~vlprompt_core.api.PromptMethod.effective_options` (found on ``build``,
        as :attr:`~vlprompt_core.api.PromptMethod.requires` is); the options as given
        when ``build`` has none. Raises the method's :class:`UserError` for conflicts;
        a result that is not :class:`EffectiveOptions` of this entry's options model is
        a :class:`ContractError`."""
        notes: tuple[str, ...] = ()
        for field in self.wraps:  # each wrapped method settles its own options first
            base = getattr(options, field)
            _check_wrappable(self, field, self.bases[base.name])
            try:
                inner = self.bases[base.name].effective(base, backbone)
            except UserError as exc:  # its options' paths, as the spec nests them
                raise UserError(*[p.replace("method.", f"method.{field}.", 1) if p.startswith("method.")
                                  else f"{field} ({base.name}): {p}" for p in exc.problems]) from None
            options = options.model_copy(update={field: inner.options})
            notes += tuple(f"{field} ({base.name}): {note}" for note in inner.notes)
        hook = getattr(self.build, "effective_options", None)
        if hook is None:
            return EffectiveOptions(options, notes)
        result = hook(options, backbone)
        if not (isinstance(result, EffectiveOptions) and isinstance(result.options, self.options)
                and all(isinstance(n, str) for n in result.notes)):
            raise ContractError(f"method {self.name!r}: effective_options must return EffectiveOptions(options, "
                                f"notes) with {self.options.__name__} options, got {result!r}"[:300])
        return EffectiveOptions(result.options, notes + tuple(result.notes)) if notes else result

    def make(self, backbone: VisionLanguageBackbone, classes: ClassSet, options: Any) -> PromptMethod:
        """The method built with ``options``: for a method that wraps others, each
        wrapped method is built first from its own entry (its section in ``options``)
        and handed to this one's ``build`` as the keyword named like its field."""
        inner = {field: self.bases[getattr(options, field).name].make(backbone, classes, getattr(options, field))
                 for field in self.wraps}
        return self.build(backbone, classes, options, **inner)


class MethodRef(dict):
    """Annotate a method option as ``MethodRef`` to wrap another method (e.g. DePT's
    head over any text-context method): the spec then takes a whole method section
    there, ``method: {name: dept, base: {name: kgcoop, kg_weight: 2}}``, validated
    against the options of the method it names (errors say ``method.base.<field>``).

    The core builds the wrapped method from its own entry and hands it, built, to the
    wrapper's ``build`` as the keyword named like the field (``build(backbone,
    classes, options, base=<PromptMethod>)``); its options settle before the
    wrapper's, and ``results.json``, result keys and checkpoints hold both. The
    wrapper's class says what it needs of the wrapped one in
    :attr:`~vlprompt_core.api.PromptMethod.needs_of_wrapped` (checked against its
    :attr:`~vlprompt_core.api.PromptMethod.provides` before anything is built). A
    wrapper cannot itself be wrapped."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        return handler.generate_schema(dict[str, Any])


def _check_wrappable(wrapper: MethodEntry, field: str, base: MethodEntry) -> None:
    """A :class:`UserError` when ``base`` lacks what ``wrapper`` needs of it."""
    needs = getattr(wrapper.build, "needs_of_wrapped", ())
    missing = [n for n in needs if n not in getattr(base.build, "provides", ())]
    if missing:
        raise UserError(f"{field}: {wrapper.name} cannot wrap {base.name!r}: it needs a method that provides "
                        f"{', '.join(repr(n) for n in missing)} (PromptMethod.provides), which {base.name} does not")


def compose_methods(methods: dict[str, MethodEntry]) -> dict[str, MethodEntry]:
    """The registered methods with every wrapper's :class:`MethodRef` fields typed as
    a section of any method that wraps none (told apart by ``name``)."""
    plain = {name: e for name, e in methods.items()
             if not any(f.annotation is MethodRef for f in e.options.model_fields.values())}
    if len(plain) == len(methods):
        return methods
    sections = [create_model(f"Wrapped_{name}", __base__=e.options,
                             name=(Literal[name], Field(description=e.description)))
                for name, e in sorted(plain.items())]
    section = sections[0] if len(sections) == 1 else Annotated[Union[tuple(sections)], Field(discriminator="name")]
    out = dict(methods)
    for name, e in methods.items():
        if name in plain:
            continue
        wraps = tuple(f for f, info in e.options.model_fields.items() if info.annotation is MethodRef)
        fields = {f: (section, Field(description=e.options.model_fields[f].description or "the wrapped method: "
                                     "a method section, {name: <method>, ...its options}")) for f in wraps}
        options = create_model(e.options.__name__, __base__=e.options, __module__=e.options.__module__, **fields)
        options.__vlprompt_wraps__ = wraps  # for wrapped_fields(): spec sections subclass it
        out[name] = dataclasses.replace(e, options=options, wraps=wraps, bases=plain)
    return out


def wrapped_fields(options: type[Options]) -> tuple[str, ...]:
    """The fields of an options model (or a spec section made from it) that hold a
    wrapped method's section; none for a method that wraps none."""
    return getattr(options, "__vlprompt_wraps__", ())


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset: options model and loader; ``check(options)`` (optional) lists
    problems found cheaply (missing folders, unreadable split files); ``classes(options)``
    (optional) gives its :class:`ClassSet` without listing its images where it can, for
    ``vlprompt validate`` to check its prompts against the backbone's text context.

    Whatever it loads must have at least two classes, images for every class and
    labels in range: a run refuses a dataset that does not
    (:func:`vlprompt_core.data.dataset_problems`)."""

    name: str
    options: type[Options]
    load: Callable[[Any], DatasetSplits]
    description: str = ""
    check: Callable[[Any], list[str]] | None = None
    classes: Callable[[Any], ClassSet] | None = None


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
    (e.g. Base, Novel, H), in display order. ``unseen_classes``: its evaluation sets
    always hold classes the training classes lack (base-to-novel), so a method that
    scores only the classes it was fitted on
    (:meth:`~vlprompt_core.api.PromptMethod.fixed_classes`) is refused by ``vlprompt
    validate`` and left out of ``method: all``.
    """

    name: str
    options: type[Options]
    plan: Callable[[Any, ProtocolContext], Plan]
    summarize: Callable[[Any, dict[str, float]], dict[str, float]]
    description: str = ""
    unseen_classes: bool = False


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
