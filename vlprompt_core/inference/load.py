"""A :class:`~.classifier.Classifier` from what a run trained: its results folder
(:func:`from_results`: the spec it recorded, the classes its protocol trained on, the
checkpoint of the pair, loaded and checked as ``vlprompt eval --from`` loads it) or a
file ``vlprompt export`` wrote (:func:`from_export`, :mod:`.exported`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ..api import ClassSet, ProtocolContext
from ..data import check_dataset
from ..engine import PairFiles, assign_trained, learned_tensors, resolve_device, set_seed
from ..engine.record import checkpoint_sources, recorded_runs
from ..errors import UserError
from ..features import weights_hash
from ..plugins import Registry, get_registry
from ..recipes import ResolvedMethod
from ..spec import validate_spec
from ..settings import TrainSpec, resolve_precision
from .classifier import Classifier
from .exported import Export, read_export


def load(source: str | Path, method: str | None = None, seed: int | None = None, classes: list[str] | None = None,
         device: str | torch.device = "cpu", registry: Registry | None = None) -> Classifier:
    """The classifier a run trained: ``source`` is its results folder (or its
    ``results.json``) or a file ``vlprompt export`` wrote. ``method`` is the method's
    label in the run and ``seed`` the seed, each needed only where the results hold
    several (a method that trains nothing, such as zero-shot CLIP, takes the first
    seed). ``classes``: other class names to predict over (default: those it was
    trained on). ``device``: ``"cpu"``, ``"cuda"``, ``"auto"`` (CUDA when there is
    one); :meth:`Classifier.to` moves it later. Every mistake is a one-line
    :class:`~vlprompt_core.errors.UserError`."""
    path = Path(source).expanduser()
    kind = source_kind(path)
    try:
        where = resolve_device(str(device))
    except RuntimeError as exc:  # not a device torch knows
        raise UserError(f"device: {device!r} is not a device ({str(exc).splitlines()[0]})") from None
    except UserError:
        raise UserError(f"device: {device!r} asked for, but CUDA is not available here") from None
    reg = registry or get_registry()
    clf = (from_results if kind == "results" else from_export)(path, method, seed, where, reg)
    if classes is not None:
        clf.set_classes(classes)
    return clf


def source_kind(path: Path) -> str:
    """``"results"`` (a results folder or its ``results.json``) or ``"export"`` (a file);
    a path that is neither is a :class:`UserError`."""
    if path.is_dir() or (path.name == "results.json" and path.is_file()):
        return "results"
    if path.is_file():
        return "export"
    raise UserError(f"{path}: no such folder or file (give a results folder 'vlprompt run' wrote, or a file "
                    "'vlprompt export' wrote)")


# ------------------------------------------------------------------- results


def from_results(path: Path, label: str | None, seed: int | None, device: torch.device, reg: Registry) -> Classifier:
    """The (method, seed) pair a results folder holds, rebuilt as the run built it: the
    settings it resolved for the method (as ``results.json`` records them), the
    backbone of its spec, the classes its protocol trained on, its checkpoint."""
    folder, results = (path.parent, path) if path.name == "results.json" else (path, path / "results.json")
    record = _read_results(results)
    spec = validate_spec(record.get("spec"), reg, f"{results} (the spec it records)")
    described = record.get("methods") if isinstance(record.get("methods"), dict) else {}
    runs = [r for r in recorded_runs(record) if r["method"] in described]
    label = _choose_label(results, label, runs, record)
    m = _resolved(results, label, described[label], reg)
    entry = reg.get("method", m.name)
    run = _choose_run(results, label, seed, [r for r in runs if r["method"] == label], record, entry.trains)
    seed = run["seed"]

    set_seed(spec.train.seeds[0])  # as the run built it: random-weight backbones are reproducible
    backbone = _backbone(reg.get("backbone", spec.backbone.name), spec.backbone, device,
                         f"method {label!r} ({m.name})", entry)
    classes = _trained_classes(results, reg, spec, seed)
    set_seed(seed)
    method = entry.make(backbone, classes, m.used if m.used is not None else m.options).to(device)
    if learned_tensors(method):
        checkpoint = _checkpoint(folder, results, run)
        if checkpoint is not None:
            PairFiles.of(folder, m, seed).load_into(method, checkpoint)
        elif m.train.epochs > 0:
            raise UserError(f"{results}: records no checkpoint for {label} seed {seed}; train it with "
                            "'vlprompt run' first")
    about = {
        "label": label, "method": m.name, "seed": seed, "source": str(results),
        "options": m.describe()["options"], "used": m.describe().get("used"), "train": m.describe()["train"],
        "sources": m.sources,
        "backbone": spec.backbone.model_dump(mode="json"), "backbone_description": backbone.description,
        "dataset": spec.dataset.model_dump(mode="json"), "protocol": spec.protocol.model_dump(mode="json"),
        "accuracy": run.get("accuracy"), "scores": run.get("summary"),
        "summary": (record.get("summary") or {}).get(label), "cost": run.get("cost"),
        "versions": record.get("versions"), "vlprompt": record.get("vlprompt"),
    }
    return Classifier(method, classes, _as_run(m.train, record.get("device")), seed, about, device)


def _as_run(train: TrainSpec, run_device: Any) -> TrainSpec:
    """``train`` with its precision as the run resolved it on its device (``auto``: bf16
    on CUDA, fp32 elsewhere), so that scores do not change with the device predicting."""
    try:
        kind = torch.device(str(run_device)).type
    except RuntimeError:
        kind = "cpu"
    return train.model_copy(update={"precision": resolve_precision(kind, train.precision)})


def _resolved(results: Path, label: str, described: Any, reg: Registry) -> ResolvedMethod:
    """The method section ``label`` as the run resolved it (``results.json``'s
    ``methods``: name, options, train settings, where each came from, key)."""
    try:
        entry = reg.get("method", described["name"])
        options = entry.options.model_validate(described["options"])
        used = entry.options.model_validate(described["used"]) if described.get("used") is not None else None
        train = TrainSpec.model_validate(described["train"])
    except (KeyError, TypeError):
        raise UserError(f"{results}: methods.{label}: not the shape 'vlprompt run' writes") from None
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserError(f"{results}: methods.{label}: {'.'.join(map(str, e['loc']))}: {e['msg']} (trained with "
                        "another version of the plug-in?)") from None
    return ResolvedMethod(label, described["name"], options, train, dict(described.get("sources") or {}),
                          str(described.get("key", "")), used, tuple(described.get("notes") or ()))


def _read_results(results: Path) -> dict:
    try:
        record = json.loads(results.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{results.parent}: no results.json in it: give a results folder 'vlprompt run' wrote (or a "
                        "file 'vlprompt export' wrote)") from None
    except ValueError as exc:
        raise UserError(f"{results}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    except OSError as exc:
        raise UserError(f"{results}: cannot be read ({exc.strerror or exc})") from None
    if recorded_runs(record) is None:
        raise UserError(f"{results}: not the shape 'vlprompt run' writes")
    return record


def _choose_label(results: Path, label: str | None, runs: list[dict], record: dict) -> str:
    labels = list(dict.fromkeys(r["method"] for r in runs))
    failed = list(dict.fromkeys(f.get("method") for f in record.get("failures") or [] if isinstance(f, dict)))
    if label is None:
        if len(labels) == 1:
            return labels[0]
        if not labels:
            raise UserError(f"{results}: no finished (method, seed) pair to take")
        raise UserError(f"{results}: holds methods {', '.join(labels)}: choose one (--method)")
    if label not in labels:
        why = " (it failed in this run)" if label in failed else ""
        raise UserError(f"{results}: no method labelled {label!r}{why}; it holds {', '.join(labels) or 'none'}")
    return label


def _choose_run(results: Path, label: str, seed: int | None, runs: list[dict], record: dict, trains: bool) -> dict:
    seeds = sorted(r["seed"] for r in runs)
    if seed is None:
        if len(seeds) == 1 or not trains:  # a method that trains nothing is the same under every seed
            return min(runs, key=lambda r: r["seed"])
        raise UserError(f"{results}: holds seeds {', '.join(map(str, seeds))} of {label}: choose one (--seed)")
    found = [r for r in runs if r["seed"] == seed]
    if not found:
        failure = next((f for f in record.get("failures") or [] if isinstance(f, dict)
                        and (f.get("method"), f.get("seed")) == (label, seed)), None)
        why = f" (it failed: {failure.get('error')})" if failure else ""
        raise UserError(f"{results}: no {label} seed {seed}{why}; it holds seeds {', '.join(map(str, seeds))}")
    return found[0]


def _checkpoint(folder: Path, results: Path, run: dict) -> Path | None:
    """The checkpoint of ``run``, taken from inside ``folder`` only (as ``eval --from`` takes it)."""
    if not run.get("checkpoint"):
        if run.get("checkpoint_from"):
            raise UserError(f"{results}: {run['method']} seed {run['seed']} was scored here with prompts trained "
                            f"elsewhere ({run['checkpoint_from']}); give the results folder that trained them")
        return None
    found = checkpoint_sources(folder).get((run["method"], run["seed"]))
    if found is None:
        raise UserError(f"{folder / run['checkpoint']}: checkpoint not found (its results.json records it)")
    return found[0]


def _backbone(b_entry, options, device: torch.device, who: str, entry):
    """The frozen backbone ``b_entry`` builds from ``options``, on ``device``, checked
    for what the method ``entry`` needs."""
    backbone = b_entry.build(options).to(device).eval().requires_grad_(False)  # frozen, as a run has it
    for capability in getattr(entry.build, "requires", ()):
        backbone.require(capability, who)
    return backbone


def _trained_classes(results: Path, reg: Registry, spec, seed: int) -> ClassSet:
    """The classes the run's protocol trained on for ``seed`` (its plan: e.g. the base
    half of a base-to-novel run), from its dataset, loaded here."""
    loaded: dict[str, Any] = {}

    def load_dataset(section):
        key = section.model_dump_json()
        if key not in loaded:
            loaded[key] = check_dataset(reg.get("dataset", section.name).load(section))
        return loaded[key]

    try:
        dataset = load_dataset(spec.dataset)
        plan = reg.get("protocol", spec.protocol.name).plan(spec.protocol, ProtocolContext(dataset, seed,
                                                                                             load_dataset))
    except UserError as exc:
        raise UserError(f"{results}: the class names come from its dataset {spec.dataset.name}, which cannot be "
                        f"loaded here ({exc.problems[0] if exc.problems else exc}); use it where the data is, or "
                        "a file 'vlprompt export' wrote") from None
    return plan.classes


# -------------------------------------------------------------------- export


def from_export(path: Path, label: str | None, seed: int | None, device: torch.device, reg: Registry) -> Classifier:
    """The classifier a file ``vlprompt export`` wrote holds, on the backbone it names,
    whose weights must hash as they did when it was exported."""
    exported: Export = read_export(path)
    head = exported.head
    if label is not None and label != head.label:
        raise UserError(f"{path}: holds method {head.label!r}, not {label!r}")
    if seed is not None and seed != head.seed:
        raise UserError(f"{path}: holds seed {head.seed}, not {seed}")
    entry = reg.get("method", head.method)
    b_entry = reg.get("backbone", head.backbone.get("name", "?"))
    try:
        options = entry.options.model_validate(head.used if head.used is not None else head.options)
        b_options = b_entry.options.model_validate({k: v for k, v in head.backbone.items() if k != "name"})
        train = TrainSpec.model_validate(head.train)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserError(f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']} (made by another version of "
                        f"{head.method} or the backbone plug-in?)") from None
    problems = b_entry.check(b_options) if b_entry.check is not None else []
    if problems:
        raise UserError(f"{path}: its backbone: {problems[0]}")
    set_seed(train.seeds[0])  # as the run built it: random-weight backbones are reproducible
    backbone = _backbone(b_entry, b_options, device, f"method {head.label!r} ({head.method})", entry)
    built = weights_hash(backbone)
    if built != head.backbone_sha256:
        raise UserError(f"{path}: made with a backbone {backbone.description or head.backbone} whose weights hash to "
                        f"{head.backbone_sha256[:16]}, the one built here hashes to {built[:16]}: its prompts belong to "
                        "other weights; use the backbone it was trained with")
    classes = ClassSet(**head.classes.model_dump())
    set_seed(head.seed)
    method = entry.make(backbone, classes, options).to(device)
    assign_trained(method, exported.trained, path)
    about = {**head.about, "label": head.label, "method": head.method, "seed": head.seed, "source": str(path),
             "options": head.options, "used": head.used, "train": head.train, "backbone": head.backbone,
             "backbone_description": backbone.description}
    return Classifier(method, classes, train, head.seed, about, device)
