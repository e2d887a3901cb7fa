"""Training and evaluation: the only place that knows how a run proceeds.

For each seed the protocol makes a plan (what trains, what is scored); each method
is built on the frozen backbone, trained (only its own parameters), checkpointed
and scored. ``results.json`` is rewritten after every (method, seed), so a crash
loses at most the pair in flight, and a rerun resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import __version__
from .api import EvalSet, Item, PromptMethod, ProtocolContext
from .data import ImageDataset, test_transform, train_transform
from .errors import UserError
from .plugins import Registry
from .results import aggregate, atomic_write_json, markdown_table, package_versions
from .spec import TrainSpec, train_for


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(epoch: int, train: TrainSpec) -> float:
    """The reference schedule: ``warmup_epochs`` at ``warmup_lr``, then cosine from
    ``lr`` with ``T_max = epochs``, stepped once per epoch (so the first epoch after
    warm-up runs at the full ``lr`` and the last one not at zero)."""
    if epoch < train.warmup_epochs:
        return train.warmup_lr
    if train.schedule == "constant":
        return train.lr
    t = epoch - train.warmup_epochs
    return train.lr * (1 + math.cos(math.pi * t / train.epochs)) / 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device: {name!r} asked for, but CUDA is not available")
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast (parameters stay fp32), or nothing for fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def trainable_parameters(method: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in method.named_parameters() if p.requires_grad}


def make_optimizer(params, train: TrainSpec) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


@dataclass
class Progress:
    """What the engine reports while it works (the CLI draws bars from it)."""

    start: Callable[[str, int], Any] = lambda desc, total: None
    advance: Callable[[Any, int], None] = lambda task, n=1: None
    stop: Callable[[Any], None] = lambda task: None


def _loader(items: list[Item], transform, batch_size: int, train: TrainSpec, shuffle: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ImageDataset(items, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(items) >= batch_size,
        num_workers=train.num_workers,
        generator=gen,
    )


@dataclass
class Engine:
    """Runs one validated spec."""

    spec: Any
    registry: Registry
    progress: Progress = field(default_factory=Progress)
    log: Callable[[str], None] = lambda msg: None

    def __post_init__(self):
        self.output = Path(self.spec.output)
        self.results_path = self.output / "results.json"
        self.device = resolve_device(self.spec.train.device)
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._datasets: dict[str, Any] = {}

    # ----------------------------------------------------------------- setup
    def spec_hash(self) -> str:
        dumped = self.spec.model_dump(mode="json", exclude={"output"})
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]

    def load_dataset(self, section):
        key = section.model_dump_json()
        if key not in self._datasets:
            plugin = self.registry.get("dataset", section.name)
            self._datasets[key] = plugin.load(section)
        return self._datasets[key]

    def method_labels(self) -> list[str]:
        labels, seen = [], {}
        for m in self.spec.method:
            base = m.label or m.name
            seen[base] = seen.get(base, 0) + 1
            labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
        return labels

    def _previous_runs(self) -> list[dict]:
        """Finished (method, seed) pairs of an earlier run of the same spec. Results of
        a different spec in the same folder are moved aside, never overwritten."""
        if not self.results_path.is_file():
            return []
        try:
            old = json.loads(self.results_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("spec_hash") == self.spec_hash():
            return old.get("runs", [])
        aside = self.results_path.with_name(f"results.{old.get('spec_hash', 'unreadable')}.json")
        self.results_path.replace(aside)
        self.log(f"{self.results_path} held results of another spec: moved to {aside.name}")
        return []

    # ------------------------------------------------------------------- run
    def run(self) -> dict:
        spec = self.spec
        t0 = time.perf_counter()
        self.output.mkdir(parents=True, exist_ok=True)
        hook = self.registry.hook
        hook.vlprompt_run_start(spec=spec.model_dump(mode="json"), output_dir=str(self.output))
        runs = self._previous_runs()
        done = {(r["method"], r["seed"]) for r in runs}
        record = {
            "vlprompt": __version__,
            "status": "running",
            "spec": spec.model_dump(mode="json"),
            "spec_hash": self.spec_hash(),
            "versions": package_versions(self._plugin_distributions()),
            "device": str(self.device),
            "runs": runs,
        }
        atomic_write_json(self.results_path, record)

        timings: dict[str, float] = {}
        tb = time.perf_counter()
        set_seed(spec.train.seeds[0])  # random-weight backbones (tests) are reproducible too
        backbone = self.registry.get("backbone", spec.backbone.name).build(spec.backbone).to(self.device)
        timings["backbone"] = time.perf_counter() - tb
        td = time.perf_counter()
        dataset = self.load_dataset(spec.dataset)
        protocol = self.registry.get("protocol", spec.protocol.name)
        timings["dataset"] = time.perf_counter() - td

        labels = self.method_labels()
        for seed in spec.train.seeds:
            plan = protocol.plan(spec.protocol, ProtocolContext(dataset, seed, self.load_dataset))
            atomic_write_json(self.output / "fewshot" / f"seed{seed}.json", plan.record)
            for label, section in zip(labels, spec.method):
                if (label, seed) in done:
                    self.log(f"{label} seed {seed}: already in {self.results_path}, skipped")
                    continue
                result = self.run_one(label, section, seed, backbone, plan)
                result["summary"] = protocol.summarize(spec.protocol, result["accuracy"])
                runs.append(result)
                atomic_write_json(self.results_path, record)
                hook.vlprompt_evaluation_done(method=label, seed=seed, results=result)

        timings["total"] = time.perf_counter() - t0
        record.update(status="complete", summary=aggregate(runs), time_s=timings)
        atomic_write_json(self.results_path, record)
        (self.output / "results.md").write_text(markdown_table(record["summary"], self.title()))
        return record

    def title(self) -> str:
        s = self.spec
        return f"{s.protocol.name} on {s.dataset.name} ({s.backbone.name})"

    def _plugin_distributions(self) -> list[str]:
        return sorted({s.distribution for s in self.registry.sources.values() if s.distribution not in ("vlprompt", "?")})

    def run_one(self, label: str, section, seed: int, backbone, plan) -> dict:
        train = train_for(self.spec, section)
        plugin = self.registry.get("method", section.name)
        set_seed(seed)
        tb = time.perf_counter()
        method: PromptMethod = plugin.build(backbone, plan.classes, section).to(self.device)
        times = {"build": time.perf_counter() - tb}
        params = trainable_parameters(method)
        epochs_log: list[dict] = []
        checkpoint = None
        tt = time.perf_counter()
        if params and train.epochs > 0:
            checkpoint = self.output / "checkpoints" / f"{label}-seed{seed}.safetensors"
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            epochs_log = self.train(label, seed, method, plan, train, checkpoint)
        times["train"] = time.perf_counter() - tt
        te = time.perf_counter()
        accuracy = {e.name: self.evaluate(label, method, e, train) for e in plan.evals}
        times["eval"] = time.perf_counter() - te
        return {
            "method": label,
            "seed": seed,
            "accuracy": accuracy,
            "trainable_parameters": sum(p.numel() for p in params.values()),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "epochs": epochs_log,
            "time_s": times,
        }

    # ----------------------------------------------------------------- train
    def train(self, label, seed, method: PromptMethod, plan, train: TrainSpec, checkpoint: Path) -> list[dict]:
        backbone = method.backbone
        params = trainable_parameters(method)
        optimizer = make_optimizer(list(params.values()), train)
        tf = train_transform(backbone.image_size, backbone.image_mean, backbone.image_std, train.crop_scale)
        loader = _loader(plan.train, tf, train.batch_size, train, shuffle=True, seed=seed)
        method.set_classes(plan.classes)
        method.train()
        log = []
        task = self.progress.start(f"{label} seed {seed}: train", train.epochs * len(loader))
        for epoch in range(train.epochs):
            lr = lr_at(epoch, train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total, count, correct = 0.0, 0, 0
            for images, labels in loader:
                images, labels = images.to(self.device), labels.to(self.device)
                with autocast(self.device, train.precision):
                    if method.modality == "text":  # the image tower is untouched: no graph through it
                        with torch.no_grad():
                            features = backbone.encode_image(images)
                        out = method(image_features=features)
                    else:
                        out = method(images=images)
                    loss = F.cross_entropy(out.logits.float(), labels)
                    for extra in out.losses.values():
                        loss = loss + extra.float()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(labels)
                count += len(labels)
                correct += (out.logits.argmax(-1) == labels).sum().item()
                self.progress.advance(task, 1)
            metrics = {"epoch": epoch, "lr": lr, "loss": total / max(count, 1), "train_acc": 100 * correct / max(count, 1)}
            log.append(metrics)
            save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(checkpoint))
            self.registry.hook.vlprompt_epoch_end(method=label, seed=seed, epoch=epoch, metrics=metrics)
        self.progress.stop(task)
        return log

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def image_features(self, backbone, eval_set: EvalSet, train: TrainSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen image features of an eval split, computed once per run."""
        key = hashlib.sha1("\n".join(f"{it.path}\t{it.label}" for it in eval_set.items).encode()).hexdigest()
        if key not in self._features:
            tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
            loader = _loader(eval_set.items, tf, train.eval_batch_size, train, shuffle=False)
            feats, labels = [], []
            task = self.progress.start(f"features: {eval_set.name}", len(loader))
            for images, y in loader:
                with autocast(self.device, train.precision):
                    feats.append(backbone.encode_image(images.to(self.device)).float())
                labels.append(y)
                self.progress.advance(task, 1)
            self.progress.stop(task)
            self._features[key] = (torch.cat(feats), torch.cat(labels).to(self.device))
        return self._features[key]

    @torch.no_grad()
    def evaluate(self, label: str, method: PromptMethod, eval_set: EvalSet, train: TrainSpec) -> float:
        """Top-1 accuracy (%) of ``method`` on ``eval_set`` under its own classifier."""
        if not eval_set.items:
            raise UserError(f"{eval_set.name}: the evaluation split is empty")
        method.eval()
        method.set_classes(eval_set.classes)
        correct = 0
        if method.modality == "text":
            feats, labels = self.image_features(method.backbone, eval_set, train)
            for i in range(0, len(labels), train.eval_batch_size):
                with autocast(self.device, train.precision):
                    logits = method(image_features=feats[i : i + train.eval_batch_size]).logits
                correct += (logits.argmax(-1) == labels[i : i + train.eval_batch_size]).sum().item()
            return 100.0 * correct / len(labels)
        backbone = method.backbone
        tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
        loader = _loader(eval_set.items, tf, train.eval_batch_size, train, shuffle=False)
        task = self.progress.start(f"{label}: eval {eval_set.name}", len(loader))
        for images, labels in loader:
            with autocast(self.device, train.precision):
                logits = method(images=images.to(self.device)).logits
            correct += (logits.argmax(-1).cpu() == labels).sum().item()
            self.progress.advance(task, 1)
        self.progress.stop(task)
        return 100.0 * correct / len(eval_set.items)
