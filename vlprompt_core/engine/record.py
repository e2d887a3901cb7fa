"""``results.json``: what a run has done, rewritten atomically after every pair, so
a crash loses at most the pair in flight and a rerun skips what is done. Results,
checkpoints and few-shot samples of other settings are moved aside, never
overwritten."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..recipes import ResolvedMethod
from ..results import atomic_write_json


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: A pair as results tell it apart: (method label, results key, seed).
Pair = tuple[str, str, int]


def previous_runs(path: Path, wanted: list[Pair], log: Callable[[str], None]) -> list[dict]:
    """Finished pairs of earlier runs recorded in ``path`` that are wanted, each once
    (:func:`reusable`). If the file holds any other result, or a result kept under a
    new label, it is moved aside (``results.<hash>.json``), never overwritten: a rerun
    never changes what an earlier run recorded."""
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_bytes())
        runs, why = recorded_runs(old), "not the shape 'vlprompt run' writes"
    except ValueError as exc:  # not JSON, not UTF-8
        old, runs, why = None, None, f"not JSON: {exc}"
    reused = reusable(runs or [], wanted)
    as_recorded = sum(any(r is old_run for old_run in runs) for r in reused) if runs is not None else 0
    if runs is None or as_recorded < len(runs):
        tag = old["spec_hash"] if runs is not None and "spec_hash" in old else "unreadable"
        aside = path.with_name(f"results.{tag}.json")
        if aside.exists():
            aside = aside.with_name(f"results.{tag}.{int(time.time())}.json")
        path.replace(aside)
        renamed = runs is not None and len(reused) == len(runs)
        held = "results now kept under new labels" if renamed else "results of other settings"
        log(f"{path} is not a vlprompt results file ({why}): moved to {aside.name}" if runs is None else
            f"{path} held {held}: moved to {aside.name}")
    return reused


def recorded_runs(record) -> list[dict] | None:
    """The finished pairs in what a results file holds, or None when it is not what
    ``vlprompt run`` writes: a mapping (its ``spec_hash`` a hex string) with a list of
    runs, each with a label, a key, a seed and a summary of numbers."""
    if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
        return None
    if "spec_hash" in record and not (isinstance(record["spec_hash"], str)
                                      and re.fullmatch(r"[0-9a-f]{1,64}", record["spec_hash"])):
        return None
    for r in record["runs"]:
        if not (isinstance(r, dict) and isinstance(r.get("method"), str) and isinstance(r.get("key"), str)
                and type(r.get("seed")) is int and isinstance(r.get("summary"), dict)
                and all(type(v) in (int, float) for v in r["summary"].values())):
            return None
    return record["runs"]


def reusable(runs: list, wanted: list[Pair]) -> list[dict]:
    """The records of ``runs`` that ``wanted`` pairs take, each record by one pair at
    most. Sections are told apart by their label as well as their key: a pair takes
    the record of its own label, else (a section renamed since) one of its key and seed
    whose label no section has any more, as a copy under the new label."""
    labels = {label for label, _, _ in wanted}
    left = [r for r in runs if isinstance(r, dict)]
    taken: dict[Pair, dict] = {}
    for own in (True, False):
        for label, key, seed in wanted:
            if (label, key, seed) in taken:
                continue
            match = next((r for r in left if (r.get("key"), r.get("seed")) == (key, seed)
                          and (r.get("method") == label if own else r.get("method") not in labels)), None)
            if match is not None:
                left = [r for r in left if r is not match]
                taken[(label, key, seed)] = match if own else {**match, "method": label}
    return [taken[pair] for pair in wanted if pair in taken]


def save_sample(output: Path, seed: int, sample: dict, log: Callable[[str], None] = lambda msg: None) -> None:
    """``fewshot/seed<N>.json``; a different sample already there, or a file that is
    not readable JSON, is moved aside."""
    path = output / "fewshot" / f"seed{seed}.json"
    if path.is_file():
        old = path.read_bytes()
        try:
            if json.loads(old) == json.loads(json.dumps(sample)):
                return
            unreadable = None
        except ValueError as exc:  # not JSON, not UTF-8
            unreadable = exc
        aside = path.with_name(f"seed{seed}.{sha256(old)[:8]}.json")
        path.replace(aside)
        if unreadable is not None:
            log(f"{path}: not readable ({unreadable}): moved to {aside.name}, the sample is written again")
    atomic_write_json(path, sample)


Sources = dict[tuple[str, int], tuple[Path, str]]


def checkpoint_sources(folder: Path) -> Sources:
    """``(label, seed) -> (checkpoint, its sha256)`` from the results in ``folder``.
    A checkpoint is taken only from inside ``folder``: a path recorded there that is
    absolute or climbs out (``..``) is refused, as is a file of another shape."""
    path = Path(folder) / "results.json"
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no results to take checkpoints from (train with 'vlprompt run' first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    runs = recorded_runs(old)
    if runs is None or not all(isinstance(r.get("checkpoint"), (str, type(None))) for r in runs):
        raise UserError(f"{path}: not the shape 'vlprompt run' writes; give --from a folder that 'vlprompt run' "
                        "wrote")
    found = {}
    for r in runs:
        if not r.get("checkpoint"):
            continue  # scored only: nothing trained
        relative = Path(r["checkpoint"])
        if relative.is_absolute() or ".." in relative.parts:
            raise UserError(f"{path}: the checkpoint of {r['method']} seed {r['seed']} ({r['checkpoint']}) is "
                            f"outside {folder}; checkpoints are taken only from inside the folder given")
        ckpt = Path(folder) / relative
        if ckpt.is_file():
            try:
                found[(r["method"], r["seed"])] = (ckpt, sha256(ckpt.read_bytes()))
            except OSError as exc:
                raise UserError(f"{ckpt}: cannot be read ({exc.strerror or exc})") from None
    return found


def run_key(m: ResolvedMethod, seed: int, sources: Sources | None) -> str:
    """Trained pairs are keyed by their settings; scored-only pairs also by the checkpoint."""
    if sources is None or (m.label, seed) not in sources:
        return m.key
    return sha256(f"{m.key}:{sources[(m.label, seed)][1]}".encode())[:12]


class RunRecord:
    """The ``results.json`` of a run in progress: kept in memory, written after every
    change (``write=False``: kept in memory only, as the processes of a distributed run
    but the main one keep it)."""

    def __init__(self, path: Path, data: dict, write: bool = True):
        self.path, self.data, self.write = path, data, write
        self.save()

    @property
    def runs(self) -> list[dict]:
        return self.data["runs"]

    def save(self) -> None:
        if self.write:
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
