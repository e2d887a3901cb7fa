"""Training and evaluation: the only place that knows how a run proceeds.

For each seed the protocol makes a plan (what trains, what is scored); each method
section, with its settings resolved (spec > recipe > defaults), is built on the
frozen backbone, trained (only its own parameters), checkpointed and scored.

Results are keyed by (method section, seed): ``results.json`` is rewritten after
every pair, so a crash loses at most the pair in flight, and a rerun skips every
pair whose settings are unchanged, e.g. after one more plug-in is installed under
``method: all`` only the new method trains. Results, checkpoints and few-shot
samples of other settings are moved aside, never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__, textbook
from .api import Batch, ContractError, EvalSet, Item, MethodOutput, ParamGroup, PromptMethod, ProtocolContext
from .cost import PeakMemory
from .data import ImageLoader, UnreadableImages, test_transform, train_transform
from .errors import UserError
from .features import Features, FeatureStore
from .lock import FolderLock
from .plugins import Registry
from .prompting import text_chunking
from .recipes import ResolvedMethod
from .results import aggregate, aggregate_cost, atomic_write_json, markdown_table, package_versions
from .spec import TrainSpec, resolve_methods, spec_hash
from .trainstate import Position, atomic_save, load_state, save_state


class PairFailed(Exception):
    """One (method, seed) pair could not finish (its loss stopped being finite, or its
    plug-in raised); it is recorded in ``results.json`` and the other pairs go on."""


class PluginError(Exception):
    """A plug-in raised (naming it and its distribution); the traceback is in ``errors.log``."""


def state_path(checkpoint: Path) -> Path:
    """Where the training state beside a pair's checkpoint goes (:mod:`~vlprompt_core.trainstate`)."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".state.safetensors")


def log_traceback(output: Path, what: str, exc: BaseException) -> Path:
    """Append ``exc``'s traceback, headed by the time and ``what`` failed, to
    ``<output>/errors.log``; return that path (error lines point to it)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "errors.log"
    with open(path, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n")
        f.write("".join(traceback.format_exception(exc)))
    return path


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(epoch: int, settings: TrainSpec) -> float:
    """The reference schedule: ``warmup_epochs`` at ``warmup_lr``, then cosine from
    ``lr`` with ``T_max = epochs``, stepped once per epoch (so the first epoch after
    warm-up runs at the full ``lr`` and the last one not at zero)."""
    if epoch < settings.warmup_epochs:
        return settings.warmup_lr
    if settings.schedule == "constant":
        return settings.lr
    t = epoch - settings.warmup_epochs
    return settings.lr * (1 + math.cos(math.pi * t / settings.epochs)) / 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device: {name!r} asked for, but CUDA is not available")
    return device


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto``: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast (parameters stay fp32), or nothing for fp32."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def trainable_parameters(method: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in method.named_parameters() if p.requires_grad}


def optimizer_groups(method: PromptMethod) -> list[ParamGroup]:
    """The method's parameter groups, checked: every trainable parameter exactly once."""
    groups = method.parameter_groups()
    trainable = {id(p): n for n, p in trainable_parameters(method).items()}
    seen: dict[int, int] = {}
    for g in groups:
        for p in g.params:
            if id(p) not in trainable:
                raise ContractError(f"{type(method).__name__}.parameter_groups() holds a parameter that does not train")
            seen[id(p)] = seen.get(id(p), 0) + 1
    missing = [n for i, n in trainable.items() if i not in seen]
    twice = [trainable[i] for i, k in seen.items() if k > 1]
    if missing or twice:
        raise ContractError(
            f"{type(method).__name__}.parameter_groups() must hold every trainable parameter once "
            f"(missing: {missing}, more than once: {twice})"
        )
    return groups


def make_optimizer(groups: list[ParamGroup], settings: TrainSpec) -> torch.optim.Optimizer:
    params = [
        {"params": g.params, "lr_scale": g.lr_scale,
         "weight_decay": settings.weight_decay if g.weight_decay is None else g.weight_decay}
        for g in groups
    ]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


@dataclass
class ProgressReporter:
    """How the engine reports long work (the CLI draws progress bars from it)."""

    start: Callable[[str, int], Any] = lambda desc, total: None
    advance: Callable[[Any, int], None] = lambda task, n=1: None
    stop: Callable[[Any], None] = lambda task: None


def _loader(items: list[Item], transform, batch_size: int, settings: TrainSpec, shuffle: bool, seed: int = 0,
            unreadable: UnreadableImages | None = None):
    return ImageLoader(items, transform, batch_size, shuffle=shuffle, num_workers=settings.num_workers, seed=seed,
                       on_unreadable=settings.unreadable_images, unreadable=unreadable)


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.#+-]", "_", label)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(method: PromptMethod, path: Path, metadata: dict[str, str]) -> None:
    """The trainable parameters (fp32, safetensors) with what they were trained as."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(method).items()}
    atomic_save(tensors, path, metadata)


def load_checkpoint(method: PromptMethod, path: Path, expect: dict[str, str]) -> None:
    """Load trained parameters into ``method``, checking that they belong to it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{path}: not a readable checkpoint ({exc})") from None
    for key in ("method", "options"):
        if key in meta and meta[key] != expect[key]:
            raise UserError(f"{path}: trained as {key} {meta[key]}, the spec has {expect[key]}")
    params = trainable_parameters(method)
    if set(tensors) != set(params):
        raise UserError(f"{path}: holds {sorted(tensors)}, the method trains {sorted(params)}")
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise UserError(f"{path}: {name} is {list(tensors[name].shape)}, the method has {list(p.shape)}")
        with torch.no_grad():
            p.copy_(tensors[name].to(p.device, p.dtype))


def make_batch(method: PromptMethod, images: torch.Tensor, labels: torch.Tensor | None) -> Batch:
    """What ``method.inputs`` ask for; frozen features once, without a graph."""
    features = None
    if "image_features" in method.inputs:
        with torch.no_grad():
            features = method.backbone.encode_image(images)
    return Batch(images=images if "images" in method.inputs else None, image_features=features, labels=labels)


def forward(method: PromptMethod, batch: Batch) -> MethodOutput:
    """``method(batch)``; in textbook mode a method whose text depends on the image
    is called one image at a time, as the reference code does."""
    if not (textbook.active() and method.per_image_text and len(batch) > 1):
        return method(batch)
    outs = [method(_one_image(batch, i)) for i in range(len(batch))]
    if any(o.extras for o in outs):
        raise ContractError(f"{type(method).__name__}: textbook mode's per-image loop cannot merge extras")
    losses = {k: torch.stack([o.losses[k] for o in outs]).mean() for k in outs[0].losses}
    return MethodOutput(torch.cat([o.logits for o in outs]), losses)


def _one_image(batch: Batch, i: int) -> Batch:
    def pick(t):
        return None if t is None else t[i : i + 1]

    return Batch(images=pick(batch.images), image_features=pick(batch.image_features), labels=pick(batch.labels))


def _check_scores(method: PromptMethod, scores: torch.Tensor, batch: Batch, n_classes: int) -> None:
    if tuple(scores.shape) != (len(batch), n_classes):
        raise ContractError(
            f"{type(method).__name__} returned scores {list(scores.shape)} for a batch of {len(batch)} images "
            f"and {n_classes} classes (does set_classes rebuild the classifier?)"
        )


@dataclass
class Engine:
    """Runs one validated spec (checked with :func:`~vlprompt_core.spec.check_spec`)."""

    spec: Any
    registry: Registry
    progress: ProgressReporter = field(default_factory=ProgressReporter)
    log: Callable[[str], None] = lambda msg: None

    def __post_init__(self):
        self.output = Path(self.spec.output)
        self.results_path = self.output / "results.json"
        self.device = resolve_device(self.spec.train.device)
        self.methods: list[ResolvedMethod] = resolve_methods(self.spec, self.registry)
        self.features = FeatureStore(self.spec.train.feature_cache, log=self.log)
        self._datasets: dict[str, Any] = {}
        self.unreadable = UnreadableImages()  # images left out under train.unreadable_images: skip

    # ----------------------------------------------------------------- setup
    def load_dataset(self, section):
        key = section.model_dump_json()
        if key not in self._datasets:
            entry = self.registry.get("dataset", section.name)
            self._datasets[key] = self._plugin_call("dataset", section.name, "load", lambda: entry.load(section))
        return self._datasets[key]

    def method_labels(self) -> list[str]:
        return [m.label for m in self.methods]

    def title(self) -> str:
        s = self.spec
        return f"{s.protocol.name} on {s.dataset.name} ({s.backbone.name})"

    def _plugin_distributions(self) -> list[str]:
        return sorted({s.distribution for s in self.registry.sources.values() if s.distribution not in ("vlprompt", "?")})

    def _previous_runs(self, wanted: set[tuple[str, int]]) -> list[dict]:
        """Finished (method, seed) pairs of earlier runs in this folder whose settings
        are those of this spec. If the file holds any other result, it is moved aside
        (``results.<hash>.json``), never overwritten."""
        if not self.results_path.is_file():
            return []
        try:
            old = json.loads(self.results_path.read_text())
            runs = old.get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            old, runs = {}, None
        reused = [r for r in runs or [] if (r.get("key"), r.get("seed")) in wanted]
        if runs is None or len(reused) < len(runs):
            tag = old.get("spec_hash") if isinstance(old, dict) and old.get("spec_hash") else "unreadable"
            aside = self.results_path.with_name(f"results.{tag}.json")
            if aside.exists():
                aside = aside.with_name(f"results.{tag}.{int(time.time())}.json")
            self.results_path.replace(aside)
            self.log(f"{self.results_path} held results of other settings: moved to {aside.name}")
        return reused

    def _save_sample(self, seed: int, sample: dict) -> None:
        """``fewshot/seed<N>.json``; a different sample already there is moved aside."""
        path = self.output / "fewshot" / f"seed{seed}.json"
        if path.is_file():
            old = path.read_bytes()
            if json.loads(old) == json.loads(json.dumps(sample)):
                return
            path.replace(path.with_name(f"seed{seed}.{_sha(old)[:8]}.json"))
        atomic_write_json(path, sample)

    # ------------------------------------------------------------------- run
    def run(self, checkpoints_from: Path | None = None) -> dict:
        """Train and score every (method, seed) pair not already done; with
        ``checkpoints_from`` (a results folder), score the prompts trained there instead
        of training (``vlprompt eval``)."""
        import vlprompt_kernels

        choice = self.spec.train.kernels
        previous = vlprompt_kernels.use_backend(choice) if choice is not None else None
        try:
            return self._run(checkpoints_from)
        finally:
            if choice is not None:
                vlprompt_kernels.use_backend(previous)

    def _run(self, checkpoints_from: Path | None) -> dict:
        spec = self.spec
        t0 = time.perf_counter()
        timings: dict[str, float] = {}

        sources = self._checkpoint_sources(checkpoints_from) if checkpoints_from is not None else None
        wanted = {(self._run_key(m, s, sources), s) for m in self.methods for s in spec.train.seeds}
        with FolderLock(self.output, log=self.log):
            runs = self._previous_runs(wanted)
            done = {(r["key"], r["seed"]) for r in runs}
            record = {
                "vlprompt": __version__,
                "status": "running",
                "spec": spec.model_dump(mode="json"),
                "spec_hash": spec_hash(self.spec),
                "methods": {m.label: m.describe() for m in self.methods},
                "versions": package_versions(self._plugin_distributions()),
                "device": str(self.device),
                "runs": runs,
                "failures": [],
            }
            if checkpoints_from is not None:
                record["checkpoints_from"] = str(checkpoints_from)
            atomic_write_json(self.results_path, record)
            try:
                self._run_pairs(record, done, sources, timings)
            except KeyboardInterrupt:
                record.update(status="interrupted", error="stopped by the user (Ctrl-C)")
                atomic_write_json(self.results_path, record)
                raise
            except UserError as exc:
                record.update(status="failed", error="; ".join(exc.problems))
                atomic_write_json(self.results_path, record)
                raise
            except Exception as exc:
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                atomic_write_json(self.results_path, record)
                raise

            order = {m.label: i for i, m in enumerate(self.methods)}
            runs.sort(key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
            timings["total"] = time.perf_counter() - t0
            record.update(status="failed" if record["failures"] else "complete", summary=aggregate(runs),
                          cost=aggregate_cost(runs), time_s=timings, unreadable_images=self.unreadable.summary())
            atomic_write_json(self.results_path, record)
            (self.output / "results.md").write_text(markdown_table(record["summary"], self.title(), record["cost"]))
            self.notify("vlprompt_run_end", results=record, output_dir=str(self.output))
        return record

    def _run_pairs(self, record: dict, done: set, sources: dict | None, timings: dict[str, float]) -> None:
        """Build the backbone, load the data, then train and score every pair not done.
        A pair whose loss stops being finite, or whose method plug-in fails, is recorded
        in ``record["failures"]`` and the other pairs go on."""
        spec, runs = self.spec, record["runs"]
        tb = time.perf_counter()
        record["kernels"] = self._kernels()
        set_seed(spec.train.seeds[0])  # random-weight backbones (tests) are reproducible too
        backbone = self._plugin_call("backbone", spec.backbone.name, "build",
                                     lambda: self.registry.get("backbone", spec.backbone.name).build(spec.backbone))
        backbone = backbone.to(self.device)
        for m in self.methods:
            for capability in getattr(self.registry.get("method", m.name).build, "requires", ()):
                backbone.require(capability, f"method {m.label!r} ({m.name})")
        timings["backbone"] = time.perf_counter() - tb
        td = time.perf_counter()
        dataset = self.load_dataset(spec.dataset)
        protocol = self.registry.get("protocol", spec.protocol.name)
        timings["dataset"] = time.perf_counter() - td
        self.notify("vlprompt_run_start", spec=record["spec"], output_dir=str(self.output))

        for seed in spec.train.seeds:
            plan = self._plugin_call("protocol", spec.protocol.name, f"seed {seed}", lambda: protocol.plan(
                spec.protocol, ProtocolContext(dataset, seed, self.load_dataset)))
            self._save_sample(seed, plan.sample)
            for m in self.methods:
                key = self._run_key(m, seed, sources)
                if (key, seed) in done:
                    self.log(f"{m.label} seed {seed}: already in {self.results_path}, skipped")
                    for r in runs:  # the label may have changed since
                        if (r["key"], r["seed"]) == (key, seed):
                            r["method"] = m.label
                    continue
                source = sources.get((m.label, seed)) if sources is not None else None
                try:
                    result = self._plugin_call("method", m.name, f"{m.label} seed {seed}", lambda: self.run_one(
                        m, seed, backbone, plan, key, source, scoring_only=sources is not None))
                except (PairFailed, PluginError) as exc:
                    self.log(f"error: {exc}")
                    record["failures"].append({"method": m.label, "seed": seed, "error": str(exc)})
                    atomic_write_json(self.results_path, record)
                    continue
                result["summary"] = protocol.summarize(spec.protocol, result["accuracy"])
                runs.append(result)
                atomic_write_json(self.results_path, record)
                if result.get("checkpoint"):
                    state_path(self.output / result["checkpoint"]).unlink(missing_ok=True)  # the pair is done
                self.notify("vlprompt_evaluation_done", method=m.label, seed=seed, results=result,
                            output_dir=str(self.output))

    def _plugin_call(self, kind: str, name: str, what: str, call: Callable[[], Any]) -> Any:
        """``call()``; an exception that is neither the user's (:class:`UserError`) nor an
        interruption becomes a :class:`PluginError` naming the plug-in and its
        distribution (the traceback goes to ``errors.log`` in the results folder)."""
        try:
            return call()
        except (UserError, PairFailed, PluginError, KeyboardInterrupt):
            raise
        except Exception as exc:
            source = self.registry.sources.get((kind, name))
            origin = f"plug-in {source.plugin} ({source.distribution} {source.version})" if source else "its plug-in"
            log = log_traceback(self.output, f"{kind} {name!r}, {what}", exc)
            raise PluginError(f"{what}: {kind} {name!r} from {origin} raised {type(exc).__name__}: {exc} "
                             f"(traceback in {log})") from exc

    def notify(self, hook: str, **kwargs) -> None:
        """Call every implementation of a lifecycle ``hook``; one that raises is reported
        (naming its plug-in and distribution) and the run goes on."""
        for impl in getattr(self.registry.hook, hook).get_hookimpls():
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:  # noqa: BLE001 - a logger must never stop a run
                source = self.registry.plugins.get(impl.plugin_name)
                origin = f"{source.distribution} {source.version}" if source else "?"
                self.log(f"warning: plug-in {impl.plugin_name} ({origin}) failed in {hook}: "
                         f"{type(exc).__name__}: {exc}")

    def _kernels(self) -> dict:
        """Select the fused-op backend (``train.kernels``, else ``$VLPROMPT_KERNELS``, else
        auto), say which one runs, once, and return the record for ``results.json``."""
        import vlprompt_kernels

        info = vlprompt_kernels.backend_info(self.device)
        if info.get("backend") is None:
            raise UserError(f"train.kernels: {info.get('error') or 'the Triton kernels cannot run here'}")
        self.log(f"kernels: {info['backend']} on {info['device']} ({info['reason']})")
        return info

    def _run_key(self, m: ResolvedMethod, seed: int, sources: dict | None) -> str:
        """Trained pairs are keyed by their settings; scored-only pairs also by the checkpoint."""
        if sources is None or (m.label, seed) not in sources:
            return m.key
        return _sha(f"{m.key}:{sources[(m.label, seed)][1]}".encode())[:12]

    def _checkpoint_sources(self, folder: Path) -> dict[tuple[str, int], tuple[Path, str]]:
        """``(label, seed) -> (checkpoint, its sha256)`` from the results in ``folder``."""
        path = Path(folder) / "results.json"
        try:
            old = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: no results to take checkpoints from (train with 'vlprompt run' first)") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
        found = {}
        for r in old.get("runs", []):
            if r.get("checkpoint"):
                ckpt = Path(folder) / r["checkpoint"]
                if ckpt.is_file():
                    found[(r["method"], r["seed"])] = (ckpt, _sha(ckpt.read_bytes()))
        return found

    def run_one(self, m: ResolvedMethod, seed: int, backbone, plan, key: str, source=None,
                scoring_only: bool = False) -> dict:
        """Train (or load) and score one (method, seed) pair; its result with what it cost."""
        with PeakMemory(self.device) as peak:
            result = self._run_one(m, seed, backbone, plan, key, source, scoring_only)
        result["cost"].update(peak_memory_mb=round(peak.mb, 1), memory=peak.kind)
        return result

    def _run_one(self, m: ResolvedMethod, seed: int, backbone, plan, key: str, source, scoring_only: bool) -> dict:
        settings = m.train
        entry = self.registry.get("method", m.name)
        set_seed(seed)
        tb = time.perf_counter()
        method: PromptMethod = entry.build(backbone, plan.classes, m.options).to(self.device)
        times = {"build": time.perf_counter() - tb}
        params = trainable_parameters(method)
        metadata = {"method": m.name, "options": json.dumps(m.describe()["options"], sort_keys=True),
                    "key": m.key, "label": m.label, "seed": str(seed)}
        epochs_log: list[dict] = []
        trained = 0  # images through a training step in this process
        checkpoint = None
        tt = time.perf_counter()
        if scoring_only and params:
            if source is None:
                raise UserError(f"{m.label} seed {seed}: no trained checkpoint for it in the results folder given")
            load_checkpoint(method, source[0], metadata)
            self.log(f"{m.label} seed {seed}: scoring the prompts of {source[0]}")
        elif params and settings.epochs > 0:
            checkpoint = Path("checkpoints") / f"{_file_label(m.label)}-seed{seed}-{m.key}.safetensors"
            with text_chunking(0 if textbook.active() else settings.text_chunk):
                epochs_log, trained = self.fit(m.label, seed, method, plan, settings, self.output / checkpoint,
                                               metadata)
        times["train"] = time.perf_counter() - tt
        te = time.perf_counter()
        with text_chunking(0 if textbook.active() else settings.text_chunk):
            accuracy = {e.name: self.evaluate(f"{m.label} seed {seed}", method, e, settings) for e in plan.evals}
        times["eval"] = time.perf_counter() - te
        times["total"] = sum(times.values())
        scored = sum(len(e.items) for e in plan.evals)
        result = {
            "method": m.label,
            "name": m.name,
            "key": key,
            "seed": seed,
            "accuracy": accuracy,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "epochs": epochs_log,
            "cost": {
                "time_s": times,
                "train_images_per_s": trained / times["train"] if trained else None,
                "eval_images_per_s": scored / times["eval"] if times["eval"] > 0 else None,
                "trainable_parameters": sum(p.numel() for p in params.values()),
            },
        }
        if scoring_only and params:
            result["checkpoint_from"] = str(source[0])
        return result

    # ----------------------------------------------------------------- train
    def fit(self, label, seed, method: PromptMethod, plan, settings: TrainSpec, checkpoint: Path,
            metadata: dict[str, str]) -> tuple[list[dict], int]:
        """Train ``method`` on the plan's training items: one log entry per epoch, and
        how many images went through a training step in this process."""
        backbone = method.backbone
        optimizer = make_optimizer(optimizer_groups(method), settings)
        tf = train_transform(backbone.image_size, backbone.image_mean, backbone.image_std, settings.crop_scale)
        if settings.augment_views and method.inputs == ("image_features",) and not textbook.active():
            batches = ViewBatches(self.train_views(backbone, plan.train, tf, settings), settings.batch_size, seed,
                                  self.device)
        else:
            if settings.augment_views and not textbook.active():
                self.log(f"{label}: augment_views applies to methods that read only frozen image features; "
                         "it trains on fresh augmentations")
            loader = _loader(plan.train, tf, settings.batch_size, settings, shuffle=True, seed=seed,
                             unreadable=self.unreadable)
            batches = ImageBatches(method, loader, self.device, settings.precision)
        method.set_classes(plan.classes)
        method.train()
        log: list[dict] = []
        state = state_path(checkpoint)
        identity = {k: metadata[k] for k in ("method", "options", "key", "seed")}
        resumed = load_state(state, method, optimizer, batches.generator, identity)
        at = Position(0)
        if resumed is not None:
            at, log = resumed
            where = f"step {at.step} of epoch {at.epoch + 1}" if at.step else f"epoch {at.epoch}"
            self.log(f"{label} seed {seed}: resuming after {where} of {settings.epochs} ({state})")
        task = self.progress.start(f"{label} seed {seed}: train", settings.epochs * len(batches))
        self.progress.advance(task, at.epoch * len(batches) + at.step)
        every = settings.checkpoint_every
        trained = 0
        for epoch in range(at.epoch, settings.epochs):
            started = time.perf_counter()
            epoch_start = batches.generator.get_state()
            lr = lr_at(epoch, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            step, (total, count, correct, terms) = (at.step, at.sums) if epoch == at.epoch else (0, [0.0, 0, 0, {}])
            batches.skip = step
            for batch in batches:
                labels = batch.labels
                with autocast(self.device, settings.precision):
                    out = forward(method, batch)
                    loss = method.loss(out, batch)
                _check_scores(method, out.logits, batch, len(plan.classes))
                if not torch.isfinite(loss):
                    raise PairFailed(
                        f"{label} seed {seed}: the loss became {loss.item()} in epoch {epoch + 1} of {settings.epochs} "
                        f"at learning rate {lr:g}; try a lower train.lr (the other pairs go on)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = len(labels)
                trained += n
                total += loss.item() * n
                count += n
                correct += (method.predict(out).argmax(-1) == labels).sum().item()
                for name, term in out.losses.items():
                    terms[name] = terms.get(name, 0.0) + float(term.detach()) * n
                self.progress.advance(task, 1)
                step += 1
                if every and step % every == 0 and step < len(batches):
                    save_state(state, method, optimizer, epoch_start,
                               Position(epoch, step, [total, count, correct, terms]), log, identity)
            method.on_epoch_end(epoch, settings.epochs)
            metrics = {"epoch": epoch, "lr": lr, "loss": total / max(count, 1),
                       "train_acc": 100 * correct / max(count, 1), "time_s": time.perf_counter() - started}
            metrics.update({f"loss.{k}": v / max(count, 1) for k, v in terms.items()})
            log.append(metrics)
            save_checkpoint(method, checkpoint, {**metadata, "epoch": str(epoch)})
            save_state(state, method, optimizer, batches.generator.get_state(), Position(epoch + 1), log, identity)
            self.notify("vlprompt_epoch_end", method=label, seed=seed, epoch=epoch, metrics=metrics,
                        output_dir=str(self.output))
        self.progress.stop(task)
        return log, trained

    @torch.no_grad()
    def train_views(self, backbone, items: list[Item], tf, settings: TrainSpec) -> Features:
        """``train.augment_views`` = K augmented views of every training image through
        the frozen image tower, ``[K, N, D]``: extracted once for every method and seed
        with these items and transform (the draws depend on the items alone, not on the
        run's seed or on what ran before), or read from the feature cache."""
        k_views = settings.augment_views
        precision = resolve_precision(self.device, settings.precision)
        key = self.features.key(backbone, items, {"kind": "train views", "views": k_views, "transform": repr(tf),
                                                  "precision": precision, "device": self.device.type})

        def compute() -> Features:
            left_out = UnreadableImages()
            loader = _loader(items, tf, settings.eval_batch_size, settings, shuffle=False, unreadable=left_out)
            task = self.progress.start(f"features: {k_views} views of {len(items)} training images",
                                       k_views * len(loader))
            views, labels = [], []
            with torch.random.fork_rng(devices=[]):
                for k in range(k_views):
                    torch.manual_seed(k)
                    feats = []
                    for images, y in loader:
                        with autocast(self.device, precision):
                            feats.append(backbone.encode_image(images.to(self.device)).float())
                        if k == 0:
                            labels.append(y)
                        self.progress.advance(task, 1)
                    if not feats:
                        raise UserError(f"none of the {len(items)} training images could be read")
                    views.append(torch.cat(feats))
            self.progress.stop(task)
            return Features(torch.stack(views), torch.cat(labels), dict(left_out.reasons))

        return self.features.get(key, "train views", compute, self.unreadable)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def image_features(self, backbone, eval_set: EvalSet, settings: TrainSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen image features of an eval split: extracted once per run for every
        method and seed, or read from the feature cache."""
        tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
        precision = resolve_precision(self.device, settings.precision)
        key = self.features.key(backbone, eval_set.items, {"kind": "test", "transform": repr(tf),
                                                           "precision": precision, "device": self.device.type})

        def compute() -> Features:
            left_out = UnreadableImages()
            loader = _loader(eval_set.items, tf, settings.eval_batch_size, settings, shuffle=False,
                             unreadable=left_out)
            feats, labels = [], []
            task = self.progress.start(f"features: {eval_set.name}", len(loader))
            for images, y in loader:
                with autocast(self.device, precision):
                    feats.append(backbone.encode_image(images.to(self.device)).float())
                labels.append(y)
                self.progress.advance(task, 1)
            self.progress.stop(task)
            if not feats:
                raise UserError(f"{eval_set.name}: none of its {len(eval_set.items)} images could be read")
            return Features(torch.cat(feats), torch.cat(labels), dict(left_out.reasons))

        found = self.features.get(key, f"features: {eval_set.name}", compute, self.unreadable)
        return found.features.to(self.device), found.labels.to(self.device)

    def eval_batches(self, label: str, method: PromptMethod, eval_set: EvalSet, settings: TrainSpec) -> Iterator[Batch]:
        """The batches ``method`` is scored on: the run's frozen features alone, or the
        test images (with those frozen features when the method asks for both). In
        textbook mode every method encodes the test images of every batch itself."""
        bs = settings.eval_batch_size
        features = None
        if "image_features" in method.inputs and not textbook.active():
            features, labels = self.image_features(method.backbone, eval_set, settings)
            if "images" not in method.inputs:
                for i in range(0, len(labels), bs):
                    yield Batch(image_features=features[i : i + bs], labels=labels[i : i + bs])
                return
        backbone = method.backbone
        tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
        loader = _loader(eval_set.items, tf, bs, settings, shuffle=False, unreadable=self.unreadable)
        task = self.progress.start(f"{label}: eval {eval_set.name}", len(loader))
        offset = 0
        for images, y in loader:
            n = len(y)
            images, y = images.to(self.device), y.to(self.device)
            if features is None:
                with autocast(self.device, settings.precision):
                    batch = make_batch(method, images, y)
            else:
                batch = Batch(images=images, labels=y, image_features=features[offset : offset + n])
            yield batch
            offset += n
            self.progress.advance(task, 1)
        self.progress.stop(task)

    @torch.no_grad()
    def evaluate(self, label: str, method: PromptMethod, eval_set: EvalSet, settings: TrainSpec) -> float:
        """Top-1 accuracy (%) of ``method`` on ``eval_set`` under its own classifier."""
        if not eval_set.items:
            raise UserError(f"{eval_set.name}: the evaluation split is empty")
        method.eval()
        method.set_classes(eval_set.classes)
        correct = scored = 0
        for batch in self.eval_batches(label, method, eval_set, settings):
            with autocast(self.device, settings.precision):
                scores = method.predict(forward(method, batch))
            _check_scores(method, scores, batch, len(eval_set.classes))
            correct += (scores.argmax(-1) == batch.labels).sum().item()
            scored += len(batch.labels)  # unreadable images left out are not scored
        if not scored:
            raise UserError(f"{eval_set.name}: none of its {len(eval_set.items)} images could be read")
        return 100.0 * correct / scored


@dataclass
class ImageBatches:
    """One epoch of augmented training images (fresh draws every epoch) as
    :class:`Batch` es for a method."""

    method: PromptMethod
    loader: ImageLoader
    device: torch.device
    precision: str

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def generator(self) -> torch.Generator:
        """What orders the images (and seeds loader workers): part of the training state."""
        return self.loader.loader.generator

    @property
    def skip(self) -> int:
        return self.loader.batches.skip

    @skip.setter
    def skip(self, n: int) -> None:
        """Start the next epoch after ``n`` batches (a run resumed mid-epoch)."""
        self.loader.batches.skip = n

    def __iter__(self) -> Iterator[Batch]:
        for images, labels in self.loader:
            images, labels = images.to(self.device), labels.to(self.device)
            with autocast(self.device, self.precision):
                batch = make_batch(self.method, images, labels)
            yield batch


class ViewBatches:
    """One epoch over pre-extracted views (``train.augment_views``): the images in a
    fresh random order (the last partial batch dropped, as the image loader does),
    each with one of its K views drawn at random."""

    def __init__(self, views: Features, batch_size: int, seed: int, device: torch.device):
        self.views = views
        self.features = views.features.to(device)
        self.labels = views.labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        n = self.labels.shape[0]
        self.drop_last = n >= batch_size
        self.skip = 0  # start the next epoch after this many batches (a run resumed mid-epoch)

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        k_views, n = self.features.shape[:2]
        order = torch.randperm(n, generator=self.generator)
        view = torch.randint(k_views, (n,), generator=self.generator)
        skip, self.skip = self.skip, 0
        for b in range(skip, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            idx_d = idx.to(self.device)
            yield Batch(image_features=self.features[view[idx].to(self.device), idx_d], labels=self.labels[idx_d])
