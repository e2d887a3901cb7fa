"""One (method, seed) pair: build the method on the frozen backbone, train it (or load
what an earlier run trained: ``vlprompt eval``), score it on the plan's evaluation sets,
and say what that cost (time, images per second, peak memory)."""

from __future__ import annotations

import time

from .. import textbook
from ..api import ContractError, PromptMethod
from ..cost import PeakMemory
from ..errors import UserError
from ..prompting import text_chunking
from ..recipes import ResolvedMethod
from .checkpoints import PairFiles
from .context import RunContext, set_seed
from .evaluate import evaluate
from .fit import train_pair
from .optim import learned_tensors, trainable_parameters


def run_pair(ctx: RunContext, m: ResolvedMethod, seed: int, backbone, plan, key: str, files: PairFiles, source=None,
             scoring_only: bool = False) -> dict:
    """Train (or, with ``scoring_only``, load from ``source``) and score one pair; its
    result for ``results.json``, with what it cost (the largest peak of the processes)."""
    with PeakMemory(ctx.device) as peak:
        result = _pair(ctx, m, seed, backbone, plan, key, files, source, scoring_only)
    result["cost"].update(peak_memory_mb=round(ctx.dist.max(peak.mb), 1), memory=peak.kind)
    if ctx.dist.distributed:
        result["cost"]["processes"] = ctx.dist.world_size
    return result


def _pair(ctx: RunContext, m: ResolvedMethod, seed: int, backbone, plan, key: str, files: PairFiles, source,
          scoring_only: bool) -> dict:
    settings, label = m.train, f"{m.label} seed {seed}"
    entry = ctx.registry.get("method", m.name)
    set_seed(seed)
    tb = time.perf_counter()
    method: PromptMethod = entry.make(backbone, plan.classes, m.used).to(ctx.device)
    times = {"build": time.perf_counter() - tb}
    params, learned = trainable_parameters(method), learned_tensors(method)
    if learned and not entry.trains:
        raise ContractError(f"{type(method).__name__} has trainable parameters or fitted tensors "
                            f"({', '.join(learned)}) but its entry says it does not train (MethodEntry.trains=False)")
    epochs_log: list[dict] = []
    trained = 0  # images through a training step in this process
    checkpoint = None
    with text_chunking(0 if textbook.active() else settings.text_chunk):
        tt = time.perf_counter()
        if scoring_only and learned:
            if source is None:
                raise UserError(f"{label}: no trained checkpoint for it in the results folder given")
            files.load_into(method, source[0])
            ctx.log(f"{label}: scoring the prompts of {source[0]}")
        elif method.fitted_tensors() or (params and settings.epochs > 0):
            checkpoint = files.checkpoint
            epochs_log, trained = train_pair(m.label, seed, method, plan, settings, files, ctx)
        times["train"] = time.perf_counter() - tt
        te = time.perf_counter()
        accuracy = {e.name: evaluate(label, method, e, settings, ctx) for e in plan.evals}
        times["eval"] = time.perf_counter() - te
    times["total"] = sum(times.values())
    scored = sum(len(e.items) for e in plan.evals)
    result = {
        "method": m.label, "name": m.name, "key": key, "seed": seed,
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
    if scoring_only and learned:
        result["checkpoint_from"] = str(source[0])
    return result

