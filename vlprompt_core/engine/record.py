"""``results.json``: what a run has done, rewritten atomically after every pair, so
a crash loses at most the pair in flight and a rerun skips what is done. Results,
checkpoints and few-shot samples of other settings are moved aside, never
overwritten."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..recipes import ResolvedMethod
from ..results import atomic_write_json


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def previous_runs(path: Path, wanted: set[tuple[str, int]], log: Callable[[str], None]) -> list[dict]:
    """Finished (method, seed) pairs of earlier runs recorded in ``path`` whose settings
    are wanted. If the file holds any other result, it is moved aside
    (``results.<hash>.json``), never overwritten."""
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
        runs = old.get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        old, runs = {}, None
    reused = [r for r in runs or [] if (r.get("key"), r.get("seed")) in wanted]
    if runs is None or len(reused) < len(runs):
        tag = old.get("spec_hash") if isinstance(old, dict) and old.get("spec_hash") else "unreadable"
        aside = path.with_name(f"results.{tag}.json")
        if aside.exists():
            aside = aside.with_name(f"results.{tag}.{int(time.time())}.json")
        path.replace(aside)
        log(f"{path} held results of other settings: moved to {aside.name}")
    return reused


def save_sample(output: Path, seed: int, sample: dict) -> None:
    """``fewshot/seed<N>.json``; a different sample already there is moved aside."""
    path = output / "fewshot" / f"seed{seed}.json"
    if path.is_file():
        old = path.read_bytes()
        if json.loads(old) == json.loads(json.dumps(sample)):
            return
        path.replace(path.with_name(f"seed{seed}.{sha256(old)[:8]}.json"))
    atomic_write_json(path, sample)


Sources = dict[tuple[str, int], tuple[Path, str]]


def checkpoint_sources(folder: Path) -> Sources:
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
                found[(r["method"], r["seed"])] = (ckpt, sha256(ckpt.read_bytes()))
    return found


def run_key(m: ResolvedMethod, seed: int, sources: Sources | None) -> str:
    """Trained pairs are keyed by their settings; scored-only pairs also by the checkpoint."""
    if sources is None or (m.label, seed) not in sources:
        return m.key
    return sha256(f"{m.key}:{sources[(m.label, seed)][1]}".encode())[:12]


class RunRecord:
    """The ``results.json`` of a run in progress: kept in memory, written after every change."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.save()

    @property
    def runs(self) -> list[dict]:
        return self.data["runs"]

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def add(self, result: dict) -> None:
        self.runs.append(result)
        self.save()

    def fail_pair(self, label: str, seed: int, error: str) -> None:
        self.data["failures"].append({"method": label, "seed": seed, "error": error})
        self.save()

    def end(self, status: str, **fields) -> None:
        self.data.update(status=status, **fields)
        self.save()

    def relabel(self, key: str, seed: int, label: str) -> None:
        """A finished pair kept under a section whose label changed since."""
        for r in self.runs:
            if (r["key"], r["seed"]) == (key, seed):
                r["method"] = label
