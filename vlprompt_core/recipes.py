"""Method recipes: how a method's authors trained it, as data.

A :class:`Recipe` holds training settings (any field of the spec's ``train``
section) and option defaults, plus :class:`RecipeRule` s that apply only under
some protocols, datasets or shot counts (e.g. CoOp's epochs per shot count,
BPL's Monte-Carlo samples per dataset), or on some backbones (family, depth and
width of a tower: :class:`~vlprompt_core.api.BackboneInfo`). Rules apply in order;
a later match overrides an earlier one.

Then the method settles the resolved options on the backbone
(:meth:`~vlprompt_core.api.PromptMethod.effective_options`): what it actually uses
(e.g. a prompt depth clamped to a shallower tower) is :attr:`ResolvedMethod.used`,
with its :attr:`~ResolvedMethod.notes`.

Resolution, per method section of a run spec (:func:`resolve_method`): what the
user wrote in the spec wins (the method's own ``train:`` overrides, then the
top-level ``train:`` section, then the section's options); what they left out
comes from the method's recipe; the rest from the global defaults (the
:class:`~vlprompt_core.settings.TrainSpec` and options-model defaults).

A plug-in may keep its recipe in a YAML file beside its code and load it with
:meth:`Recipe.from_yaml`.

The recipe models are data of the plug-in contract and live in
:mod:`vlprompt_core.api`; plug-ins import them from here
(``from vlprompt_core.recipes import Recipe, RecipeRule``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from .api import BackboneInfo, Recipe, RecipeCondition, RecipeRule  # noqa: F401 - plug-ins import them from here
from .errors import UserError
from .settings import TrainOverride, TrainSpec, device_type, resolve_precision


def check_recipe(recipe: Recipe, options_model: type[BaseModel], method: str) -> None:
    """Raise a clear error when a recipe names a train field or option that does not exist."""
    parts = [("train", recipe.train, "options", recipe.options)]
    parts += [(f"rules[{i}].train", r.train, f"rules[{i}].options", r.options) for i, r in enumerate(recipe.rules)]
    problems = []
    for train_where, train, opt_where, options in parts:
        unknown = set(train) - set(TrainOverride.model_fields)
        if unknown:
            problems.append(f"recipe of method {method!r}: {train_where} has unknown field(s) {sorted(unknown)}")
        unknown = set(options) - set(options_model.model_fields)
        if unknown:
            problems.append(f"recipe of method {method!r}: {opt_where} has unknown option(s) {sorted(unknown)}")
    if problems:
        raise UserError(*problems)


@dataclass
class ResolvedMethod:
    """One method section of a run spec with every setting decided.

    ``sources`` tells, for each train field and option, where its value came from:
    ``"spec"``, ``"recipe"`` or ``"default"``. ``key`` identifies what the
    (method, seed) results depend on: two sections with the same key give the
    same results, so a finished one is never trained again. It is made of
    ``options`` (spec and recipe), not of ``used``: those follow from ``options``
    and the backbone section, which the key holds, so keys stay what they were.

    ``used`` are the options the method uses on the backbone (what
    :meth:`~vlprompt_core.api.MethodEntry.effective` returned for it, :meth:`settle`),
    ``notes`` say why they differ from ``options``; the engine builds the method
    with ``used``.
    """

    label: str
    name: str
    options: Any  # the method's validated options model
    train: Any  # a TrainSpec
    sources: dict[str, str] = field(default_factory=dict)
    key: str = ""
    used: Any = None
    notes: tuple[str, ...] = ()
    #: For a method that wraps others: one line each on how the recipes combined.
    wrapping: tuple[str, ...] = ()

    def settle(self, entry, backbone: BackboneInfo) -> None:
        """Set :attr:`used` and :attr:`notes` from the method's effective options on
        ``backbone``; its conflicts are a :class:`UserError` naming the section."""
        try:
            effective = entry.effective(self.options, backbone)
        except UserError as exc:
            raise UserError(*[f"method {self.label!r}: {p}" for p in exc.problems]) from None
        self.used, self.notes = effective.options, tuple(effective.notes)

    def changed(self) -> dict[str, tuple[Any, Any]]:
        """``{option: (asked for, used)}`` for every option the method settled otherwise."""
        if self.used is None:
            return {}
        asked, used = _options(self.options), _options(self.used)
        return {k: (asked.get(k), v) for k, v in used.items() if asked.get(k) != v}

    def settled_lines(self) -> list[str]:
        """What the method uses where it differs from what it was asked, for people: its
        notes (a line each, they say why), or one line of the changed values when it
        gave none; nothing where it uses what it was asked."""
        if self.notes:
            return [*self.wrapping, *(f"{self.label}: {note}" for note in self.notes)]
        changed = self.changed()
        return [*self.wrapping, *([f"{self.label} uses " + ", ".join(f"{k}={used!r} (asked {asked!r})"
                                                                     for k, (asked, used) in changed.items())]
                                  if changed else [])]

    def option(self, key: str) -> Any:
        """The value of option ``key``; ``base.n_ctx`` for an option of a wrapped method."""
        value = self.options
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def describe(self) -> dict[str, Any]:
        """Plain data for ``results.json``: ``used`` and ``notes`` once settled."""
        out = {
            "name": self.name,
            "key": self.key,
            "options": _options(self.options),
            "train": self.train.model_dump(mode="json"),
            "sources": self.sources,
        }
        if self.used is not None:
            out.update(used=_options(self.used), notes=list(self.notes))
        return out


def _options(options) -> dict[str, Any]:
    """A method section's options as plain data, without what every section has."""
    return options.model_dump(mode="json", exclude={"name", "label", "train"})


def backbone_info(spec, registry) -> BackboneInfo:
    """What the spec's backbone entry tells without loading weights
    (:attr:`~vlprompt_core.api.BackboneEntry.info`); an empty :class:`BackboneInfo`
    (nothing known) when it tells nothing, or its options are wrong (its ``check``
    says why)."""
    entry = registry.get("backbone", spec.backbone.name)
    if entry.info is None:
        return BackboneInfo()
    try:
        return entry.info(spec.backbone) or BackboneInfo()
    except (UserError, OSError):
        return BackboneInfo()


def run_context(spec, backbone: BackboneInfo | None = None) -> dict[str, Any]:
    """What recipe rules look at: protocol, dataset trained on, shots, and what the
    backbone is (family, depth and width of each tower)."""
    return {
        "protocol": spec.protocol.name,
        "dataset": spec.dataset.name,
        "shots": getattr(spec.protocol, "shots", None),
        **(backbone or BackboneInfo()).matched(),
    }


#: Train fields that do not change what a (method, seed) pair computes. ``device`` is
#: keyed by its type, and ``precision`` as that type resolves it (:func:`method_key`).
_NOT_IN_KEY = {"seeds", "device", "num_workers", "eval_batch_size", "unreadable_images", "kernels",
               "text_chunk", "feature_cache", "checkpoint_every"}
#: Train fields in the key only when they differ from their default (newer fields:
#: results keyed before they existed stay valid).
_IN_KEY_WHEN_SET = {"augment_views": 0, "adam_eps": 1e-8, "schedule_per": "epoch", "min_lr": 0.0, "steps": None}
#: Train fields only training reads: not in the key of a method whose entry says it
#: does not train (``MethodEntry.trains``). What scoring reads stays in: ``precision``
#: (the autocast dtype of the image and text towers, so the scores); the test-time
#: image transform is the backbone's, keyed with it (``crop_scale`` is the training
#: crop). A new train field is in every key until it is named here.
_TRAINING_ONLY = {"epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
                  "warmup_epochs", "warmup_lr", "crop_scale", "augment_views", "adam_eps", "schedule_per", "min_lr", "steps"}


def resolve_method(spec, section, label: str, entry, backbone: BackboneInfo | None = None) -> ResolvedMethod:
    """Decide every train setting and option of one method section (spec > recipe > default),
    then settle the options on ``backbone`` (:meth:`ResolvedMethod.settle`)."""
    backbone = backbone or BackboneInfo()
    context = run_context(spec, backbone)
    if entry.recipe:  # a rule that would apply but for what the backbone cannot tell
        unknown = sorted({k for rule in entry.recipe.rules if (missing := rule.when.unknown(context))
                          and rule.when.model_copy(update=dict.fromkeys(missing)).matches(context)
                          for k in missing})
        if unknown:
            raise UserError(f"method {label!r}: its recipe has rules on the backbone's {', '.join(unknown)}, which "
                            f"backbone {spec.backbone.name!r} cannot tell before loading its weights")
    recipe_train, recipe_options = (entry.recipe.for_context(context) if entry.recipe else ({}, {}))

    # train: defaults < recipe < top-level spec < the section's own overrides
    user_train = spec.train.model_dump(include=spec.train.model_fields_set)
    own = section.train.model_dump(include=section.train.model_fields_set) if section.train is not None else {}
    own = {k: v for k, v in own.items() if v is not None}
    user = {**user_train, **own}
    if "epochs" in user and "steps" not in user:  # epochs written in the spec beat a recipe's budget of steps
        recipe_train = {k: v for k, v in recipe_train.items() if k != "steps"}
    merged = {**recipe_train, **user}
    try:
        train = TrainSpec.model_validate(merged)
    except ValidationError as exc:
        raise UserError(*[f"method {label!r}: train.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                          for e in exc.errors()]) from None
    sources = {}
    for name in TrainSpec.model_fields:
        sources[f"train.{name}"] = (
            "spec" if name in own or name in user_train else "recipe" if name in recipe_train else "default"
        )

    # a wrapped method's options first: its recipe < the wrapper's recipe for it < the spec
    wrapping = []
    for ref in entry.wraps:
        per_base = recipe_options.pop(ref, None) or {}
        wrapped = getattr(section, ref)
        given = ", ".join(f"{k}={v!r}" for k, v in (per_base.get(wrapped.name) or {}).items()) or "nothing"
        wrapping.append(f"{label}: {section.name} over {wrapped.name}: {ref} options from {wrapped.name}'s recipe, "
                        f"then {section.name}'s recipe for {wrapped.name} ({given}), then the spec; train settings "
                        f"from {section.name}'s recipe only")
        inner, inner_sources = _resolve_wrapped(wrapped, entry.bases, per_base.get(wrapped.name, {}), context,
                                                f"method {label!r}: {ref}")
        section = section.model_copy(update={ref: inner})
        sources.update({f"{ref}.{k}": v for k, v in inner_sources.items()})

    # options: defaults < recipe < what the section says
    reserved = {"name", "label", "train"}
    user_options = section.model_dump(include=section.model_fields_set - reserved)
    applied = {k: v for k, v in recipe_options.items() if k not in user_options}
    if applied:
        try:
            settled = {ref: getattr(section, ref) for ref in entry.wraps}  # as resolved above
            options = type(section).model_validate({**section.model_dump(include=section.model_fields_set),
                                                    **applied, **settled})
        except ValidationError as exc:
            why = ", ".join(f"{k}={v!r}" for k, v in applied.items())
            raise UserError(*[f"method {label!r}: {e['msg']} (with the recipe's {why}; write the option in the "
                              "spec to override it)" for e in exc.errors()]) from None
    else:
        options = section
    for name in entry.options.model_fields:
        if name not in entry.wraps:
            sources[name] = "spec" if name in user_options else "recipe" if name in applied else "default"

    resolved = ResolvedMethod(label, section.name, options, train, sources, wrapping=tuple(wrapping))
    resolved.key = method_key(spec, resolved, entry.trains)
    try:
        resolved.settle(entry, backbone)
    except UserError:
        raise
    except Exception as exc:  # a fault in the plug-in, not the user's: one line all the same, never a traceback
        raise UserError(f"method {label!r}: {section.name}'s effective_options raised {type(exc).__name__}: {exc} "
                        "(a fault in its plug-in: report it to its authors)") from exc
    return resolved


def _resolve_wrapped(section, bases: dict, wrapper_recipe: dict, context: dict, where: str):
    """The options of a wrapped method's section (:class:`~vlprompt_core.api.MethodRef`):
    its own recipe's options, then what the wrapper's recipe gives for it (the
    wrapper's authors' setting of that method), then what the section says; and where
    each came from. Only the wrapper's train settings apply: the wrapped method's
    recipe trains nothing of its own."""
    own = bases[section.name].recipe
    recipe = {**(own.for_context(context)[1] if own else {}), **wrapper_recipe}
    written = section.model_fields_set - {"name"}
    applied = {k: v for k, v in recipe.items() if k not in written}
    try:
        options = type(section).model_validate({**section.model_dump(include=section.model_fields_set), **applied})
    except ValidationError as exc:
        raise UserError(*[f"{where}: {e['msg']} (with the recipes' {applied}; write the option in the spec to "
                          "override it)" for e in exc.errors()]) from None
    sources = {name: "spec" if name in written else "recipe" if name in applied else "default"
               for name in bases[section.name].options.model_fields}
    return options, sources


def method_key(spec, resolved: ResolvedMethod, trains: bool = True) -> str:
    """A short hash of everything a (method, seed) result depends on except the seed;
    for a method that does not train (``trains`` False), without the train settings
    only training reads, so its runs under any training settings are the same pairs.
    Keyed by the device type it computes on and the precision that type resolves
    ``auto`` to, as they resolve here (a CUDA bf16 pair is never resumed on the CPU)."""
    left_out = _NOT_IN_KEY | {name for name, default in _IN_KEY_WHEN_SET.items()
                              if getattr(resolved.train, name) == default}
    payload = {
        "method": resolved.name,
        "options": _options(resolved.options),
        "train": resolved.train.model_dump(mode="json", exclude=left_out if trains else left_out | _TRAINING_ONLY),
        "device": device_type(resolved.train.device),
        "backbone": spec.backbone.model_dump(mode="json"),
        "dataset": spec.dataset.model_dump(mode="json"),
        "protocol": spec.protocol.model_dump(mode="json"),
    }
    payload["train"]["precision"] = resolve_precision(payload["device"], resolved.train.precision)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
