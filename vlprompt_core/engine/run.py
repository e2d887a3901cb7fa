"""The run: which (method, seed) pairs, in what order, and what is recorded.

For each seed the protocol makes a plan (what trains, what is scored); each method
section, with its settings resolved (spec > recipe > defaults), is built on the
frozen backbone, trained (only its own parameters), checkpointed and scored.

Results are keyed by (method section, seed): ``results.json`` is rewritten after
every pair, so a crash loses at most the pair in flight, and a rerun skips every
pair whose settings are unchanged, e.g. after one more plug-in is installed under
``method: all`` only the new method trains.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..api import BackboneInfo, EvalSet, PromptMethod, ProtocolContext
from ..data import check_dataset, check_plan, data_fingerprint
from ..errors import StorageError, UserError, storage_problem
from ..features import FeatureStore
from ..lock import FolderLock
from ..plugins import Registry
from ..recipes import ResolvedMethod, backbone_info
from ..results import aggregate, aggregate_cost, markdown_table, package_versions
from ..settings import TrainSpec
from ..spec import dataset_sections, resolve_methods, spec_hash
from . import distributed
from . import record as rec
from .checkpoints import PairFiles
from .context import ProgressReporter, RunContext, resolve_device, set_seed
from .evaluate import evaluate
from .faults import PairFailed, PluginError, interruption
from .pair import run_pair
from .strategy import Strategy


@dataclass
class Engine:
    """Runs one validated spec (checked with :func:`~vlprompt_core.spec.check_spec`).
    ``backbone``: a frozen backbone to use instead of building the spec's (tests);
    ``strategy``: the processes the run is spread over (default: the ``torch.distributed``
    group this process belongs to, if any, else this process alone; :mod:`.distributed`)."""

    spec: Any
    registry: Registry
    progress: ProgressReporter = field(default_factory=ProgressReporter)
    log: Callable[[str], None] = lambda msg: None
    backbone: Any = None
    strategy: Strategy | None = None

    def __post_init__(self):
        self.dist = self.strategy if self.strategy is not None else distributed.current()
        if not self.dist.is_main:  # the main process alone logs and draws progress
            self.log, self.progress = (lambda msg: None), ProgressReporter()
        self.output = Path(self.spec.output)
        self.results_path = self.output / "results.json"
        #: What the backbone is, told without loading it (or read from the one given).
        self.backbone_info = backbone_info(self.spec, self.registry)
        if self.backbone is not None:
            self.backbone_info = BackboneInfo.of(self.backbone, self.backbone_info)
        self.methods: list[ResolvedMethod] = resolve_methods(self.spec, self.registry, self.backbone_info)
        cache = self.spec.train.feature_cache if self.dist.is_main else None  # one writer of the feature cache
        self.ctx = RunContext(self.output, self.dist.place(resolve_device(self.spec.train.device)), self.registry,
                              FeatureStore(cache, log=self.log), self.log, self.progress, dist=self.dist)
        self._datasets: dict[str, Any] = {}
        self._data_key: str | None = None

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def features(self) -> FeatureStore:
        return self.ctx.features

    def load_dataset(self, section):
        """The dataset ``section`` names, loaded once; one that is not what every dataset
        must be (:func:`~vlprompt_core.data.dataset_problems`) is refused."""
        key = section.model_dump_json()
        if key not in self._datasets:
            entry = self.registry.get("dataset", section.name)
            ds = self.ctx.plugin_call("dataset", section.name, "load", lambda: entry.load(section))
            self._datasets[key] = check_dataset(ds)
        return self._datasets[key]

    def key_by_data(self) -> None:
        """Load every dataset the spec names (:func:`~vlprompt_core.spec.dataset_sections`)
        and fold what they hold (:func:`~vlprompt_core.data.data_fingerprint`) into each
        method's key, once: results, checkpoints and training states made with other
        data are never taken for this run's."""
        if self._data_key is None:
            sections = dataset_sections(self.spec, self.registry)
            self._data_key = data_fingerprint([self.load_dataset(section) for _, section in sections])
            for m in self.methods:
                m.key = rec.sha256(f"{m.key}:data:{self._data_key}".encode())[:12]

    def method_labels(self) -> list[str]:
        return [m.label for m in self.methods]

    def title(self) -> str:
        s = self.spec
        return f"{s.protocol.name} on {s.dataset.name} ({s.backbone.name})"

    def evaluate(self, label: str, method: PromptMethod, eval_set: EvalSet, settings: TrainSpec) -> float:
        """Top-1 accuracy (%) of ``method`` on ``eval_set`` within this run (:func:`.evaluate.evaluate`)."""
        return evaluate(label, method, eval_set, settings, self.ctx)

    def run(self, checkpoints_from: Path | None = None) -> dict:
        """Train and score every (method, seed) pair not already done; with
        ``checkpoints_from`` (a results folder), score the prompts trained there instead
        of training (``vlprompt eval``)."""
        import vlprompt_kernels

        choice = self.spec.train.kernels
        previous = vlprompt_kernels.use_backend(choice) if choice is not None else None
        try:
            return self._run(checkpoints_from)
        except OSError as exc:  # one of the run's own files, before its record could say so (or after)
            raise StorageError(self._storage_problem(exc)) from exc
        finally:
            if choice is not None:
                vlprompt_kernels.use_backend(previous)

    def _storage_problem(self, exc: OSError) -> str:
        """One line for a file of the run that the file system refused, saying what to do."""
        where = Path(os.path.abspath(exc.filename)) if isinstance(exc.filename, (str, os.PathLike)) else None
        places = ((self.spec.train.feature_cache, "set train.feature_cache to another folder (or leave it out)"),
                  (self.output, "give the run another output folder (--output)"))
        elsewhere = next((advice for folder, advice in places if folder is not None and where is not None
                          and Path(os.path.abspath(folder)) in (where, *where.parents)), None)
        return f"{storage_problem(exc, elsewhere)}; then run the same command again to continue"

    def _stopped(self, record: rec.RunRecord, exc: BaseException) -> BaseException:
        """What a run stopped by ``exc`` raises, once its record says why (where it can
        be written; where not, the error says so): an interruption, the user's error, an
        error of the file system (:class:`StorageError`), or a crash."""
        if isinstance(exc, OSError):
            exc = StorageError(self._storage_problem(exc))
        if isinstance(exc, KeyboardInterrupt):
            status, error = "interrupted", interruption(exc)
        elif isinstance(exc, UserError):
            status, error = "failed", "; ".join(exc.problems)
        else:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        try:
            record.end(status, error=error)
        except OSError as failed:
            unsaved = f"{record.path} could not be updated ({failed.strerror or failed}), so it does not say so"
            if isinstance(exc, UserError):
                exc.problems[-1] += f"; {unsaved}"
                exc.args = ("\n".join(exc.problems),)
            else:
                self.log(f"error: {unsaved}")
        return exc

    def _run(self, checkpoints_from: Path | None) -> dict:
        spec = self.spec
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        sources = rec.checkpoint_sources(checkpoints_from) if checkpoints_from is not None else None
        td = time.perf_counter()
        self.key_by_data()
        timings["dataset"] = time.perf_counter() - td
        wanted = [(m.label, rec.run_key(m, s, sources), s) for m in self.methods for s in spec.train.seeds]
        if self.dist.describe():
            self.log(self.dist.describe())
        with distributed.main_holds(self.dist, lambda: FolderLock(self.output, log=self.log)):
            runs = self.dist.from_main(lambda: rec.previous_runs(self.results_path, wanted, self.log))
            done = {(r["method"], r["key"], r["seed"]) for r in runs}
            distributions = sorted({s.distribution for s in self.registry.sources.values()
                                    if s.distribution not in ("vlprompt", "?")})
            data = {
                "vlprompt": __version__, "status": "running",
                "spec": spec.model_dump(mode="json"), "spec_hash": spec_hash(spec),
                "methods": {m.label: m.describe() for m in self.methods},
                "versions": package_versions(distributions),
                "device": str(self.device), "runs": runs, "failures": [],
            }
            if checkpoints_from is not None:
                data["checkpoints_from"] = str(checkpoints_from)
            if self.dist.distributed:
                data["processes"] = self.dist.world_size
            record = rec.RunRecord(self.results_path, data, write=self.dist.is_main)
            try:
                self._run_pairs(record, done, sources, timings)
            except BaseException as exc:
                stop = self._stopped(record, exc)
                if stop is exc:
                    raise
                raise stop from exc

            order = {m.label: i for i, m in enumerate(self.methods)}
            runs.sort(key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
            timings["total"] = time.perf_counter() - t0
            record.end("failed" if data["failures"] else "complete", summary=aggregate(runs),
                       cost=aggregate_cost(runs), time_s=timings, unreadable_images=self.ctx.unreadable.summary())
            if self.dist.is_main:
                (self.output / "results.md").write_text(markdown_table(data["summary"], self.title(), data["cost"]))
            self.ctx.notify("vlprompt_run_end", results=data)
        return data

    def _run_pairs(self, record: rec.RunRecord, done: set, sources: rec.Sources | None,
                   timings: dict[str, float]) -> None:
        """Build the backbone, load the data, then train and score every pair not done.
        A pair that diverges (loss, tensors or scores), or whose method plug-in fails, is recorded
        in the record's failures and the other pairs go on."""
        spec, ctx = self.spec, self.ctx
        tb = time.perf_counter()
        record.data["kernels"] = self._kernels()
        set_seed(spec.train.seeds[0])  # random-weight backbones (tests) are reproducible too
        backbone = self.backbone
        if backbone is None:
            entry = self.registry.get("backbone", spec.backbone.name)
            backbone = ctx.plugin_call("backbone", spec.backbone.name, "build", lambda: entry.build(spec.backbone))
        backbone = backbone.to(self.device).eval().requires_grad_(False)  # frozen: no method's train() reaches it
        for m in self.methods:
            for capability in getattr(self.registry.get("method", m.name).build, "requires", ()):
                backbone.require(capability, f"method {m.label!r} ({m.name})")
        self._settle(record, BackboneInfo.of(backbone, self.backbone_info))
        timings["backbone"] = time.perf_counter() - tb
        dataset = self.load_dataset(spec.dataset)  # loaded (and timed) by key_by_data
        protocol = self.registry.get("protocol", spec.protocol.name)
        ctx.notify("vlprompt_run_start", spec=record.data["spec"])

        for seed in spec.train.seeds:
            plan = ctx.plugin_call("protocol", spec.protocol.name, f"seed {seed}", lambda: protocol.plan(
                spec.protocol, ProtocolContext(dataset, seed, self.load_dataset)))
            check_plan(plan, f"protocol {spec.protocol.name}")
            if self.dist.is_main:
                rec.save_sample(self.output, seed, plan.sample, self.log)
            for m in self.methods:
                key = rec.run_key(m, seed, sources)
                if (m.label, key, seed) in done:
                    self.log(f"{m.label} seed {seed}: already in {self.results_path}, skipped")
                    continue
                source = sources.get((m.label, seed)) if sources is not None else None
                files = PairFiles.of(self.output, m, seed)
                try:
                    result = ctx.plugin_call("method", m.name, f"{m.label} seed {seed}", lambda: run_pair(
                        ctx, m, seed, backbone, plan, key, files, source, scoring_only=sources is not None))
                except (PairFailed, PluginError) as exc:
                    if isinstance(exc, PluginError) and self.dist.world_size > 1:
                        raise  # it may be this process's alone: the others cannot go on without it
                    self.log(f"error: {exc}")
                    record.fail_pair(m.label, seed, str(exc))
                    continue
                result["summary"] = protocol.summarize(spec.protocol, result["accuracy"])
                record.add(result)
                if result.get("checkpoint") and self.dist.is_main:
                    files.training_done()
                ctx.notify("vlprompt_evaluation_done", method=m.label, seed=seed, results=result)

    def _settle(self, record: rec.RunRecord, info: BackboneInfo) -> None:
        """Each method's options settled on the built backbone (``info``), as the method
        is then built with them, recorded in ``results.json`` (``methods.<label>.used``
        and ``notes``, and the ``backbone`` it was told) and said where they differ from
        what was told before the backbone loaded."""
        for m in self.methods:
            before = (m.used, m.notes)
            entry = self.registry.get("method", m.name)
            self.ctx.plugin_call("method", m.name, "effective_options", lambda: m.settle(entry, info))
            if (m.used, m.notes) != before:
                for line in m.settled_lines():
                    self.log(line)
            record.data["methods"][m.label] = m.describe()
        record.data["backbone"] = info.describe()
        record.save()

    def _kernels(self) -> dict:
        """Select the fused-op backend (``train.kernels``, else ``$VLPROMPT_KERNELS``, else
        auto), say which one runs, once, and return the record for ``results.json``."""
        import vlprompt_kernels

        info = vlprompt_kernels.backend_info(self.device)
        if info.get("backend") is None:
            raise UserError(f"train.kernels: {info.get('error') or 'the Triton kernels cannot run here'}")
        self.log(f"kernels: {info['backend']} on {info['device']} ({info['reason']})")
        return info
