"""Sweeps: a base run spec and a grid over its fields, expanded into runs.

A sweep file::

    base: quickstart.yaml            # a run spec file (relative to this file), or
    # spec: {backbone: ..., ...}     # the run spec itself
    grid:                            # dotted paths into the spec; one list of values per axis
      method.name: [coop, cocoop]
      protocol.shots: [1, 2, 4, 8, 16]
    output: runs/fewshot-study       # default: runs/<sweep file name>
    resources: {cpus: 1, gpus: 0}    # what each run asks for (Ray), and its torch threads

expands into one run per combination, each a complete run spec with its own
readable folder under ``output`` (``name-coop_shots-1``...). Every run is validated
before any starts. A run is an ordinary ``vlprompt run`` of that spec in that
folder, so a sweep started again skips finished runs (and finished pairs of
unfinished ones). Executors (:mod:`vlprompt_core.executors`) decide where runs go.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError
from .lock import FolderLock
from .plugins import Registry
from .results import atomic_write_json
from .settings import Folder
from .spec import check_spec, error_message, read_yaml, spec_hash, validate_spec


class Resources(BaseModel):
    """What one run asks for: Ray schedules by it; every executor runs torch with ``cpus`` threads."""

    model_config = ConfigDict(extra="forbid")

    cpus: Optional[int] = Field(None, ge=1, le=4096, description="CPU cores per run (default: local, all cores "
                                "shared by the parallel runs; Ray, 1)")
    gpus: float = Field(0, ge=0, le=64, description="GPUs per run (Ray; fractions share a GPU)")


class SweepSpec(BaseModel):
    """A sweep file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: Optional[Path] = Field(None, description="the run spec every run starts from (relative to the sweep file)")
    spec: Optional[dict[str, Any]] = Field(None, description="the run spec itself, in place of base")
    grid: dict[str, list[Any]] = Field(min_length=1, description="dotted path -> the values it takes, one axis each")
    name: Optional[str] = Field(None, description="folder name of a run, e.g. '{method.name}-{protocol.shots}shot' "
                                "(default: each axis' last key and value)")
    output: Optional[Folder] = Field(None, description="folder of the runs (default: runs/<sweep file name>)")
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _one_base(self):
        if (self.base is None) == (self.spec is None):
            raise ValueError("give the base run spec as either 'base' (a file) or 'spec' (inline), not both")
        for path, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{path}: needs at least one value")
            if not re.fullmatch(r"[A-Za-z_][\w]*(\.(\w+))*", path):
                raise ValueError(f"grid: {path!r} is not a dotted path such as protocol.shots")
        return self


@dataclass
class Run:
    """One run of a sweep: its values on the grid, its spec and its folder."""

    folder: str
    values: dict[str, Any]
    data: dict[str, Any]
    spec: Any = field(default=None, repr=False)  # validated

    @property
    def output(self) -> Path:
        return Path(self.spec.output)

    def done(self) -> bool:
        """Finished with these very settings (``results.json`` complete, same spec)."""
        try:
            record = json.loads((self.output / "results.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and record.get("status") == "complete" and \
            record.get("spec_hash") == spec_hash(self.spec)


def set_path(data: dict, path: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``a.b.c`` (a number indexes a list; missing
    mappings are made), or a :class:`UserError` naming where the path breaks."""
    keys = path.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UserError(f"grid.{path}: {'.'.join(keys[:i]) or 'the spec'} is a list of {len(node)}; "
                                f"{key!r} is not an index in it")
            key = int(key)
        elif not isinstance(node, dict):
            raise UserError(f"grid.{path}: {'.'.join(keys[:i])} is {node!r} in the base spec, not a section")
        elif key.isdigit() and key not in node:
            raise UserError(f"grid.{path}: {'.'.join(keys[:i]) or 'the spec'} is a single section in the base spec, "
                            f"not a list to index")
        if last:
            node[key] = copy.deepcopy(value)
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
            if node is None:
                raise UserError(f"grid.{path}: {where} is empty in the base spec")


def short_value(value: Any) -> str:
    """A grid value as a few characters of a folder name."""
    if isinstance(value, dict):
        value = value.get("label") or value.get("name") or json.dumps(value, sort_keys=True)
    elif isinstance(value, (list, tuple)):
        value = "-".join(short_value(v) for v in value)
    text = re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(value)).strip("-.")
    return text[:60] or "x"


def axis_names(paths: list[str]) -> dict[str, str]:
    """Each path's last key, or the whole path where two axes end alike."""
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: (k if last.count(k) == 1 else p.replace(".", "-")) for p, k in zip(paths, last)}


def _folder(template: str | None, values: dict[str, Any], names: dict[str, str]) -> str:
    if template is None:
        return "_".join(f"{names[p]}-{short_value(v)}" for p, v in values.items())
    unknown = [k for k in re.findall(r"\{([^}]*)\}", template) if k not in values]
    if unknown:
        raise UserError(f"name: {{{unknown[0]}}} is not an axis of the grid (axes: {', '.join(values)})")
    folder = re.sub(r"\{([^}]*)\}", lambda m: short_value(values[m.group(1)]), template)
    if folder.startswith("/") or any(part in ("", ".", "..") for part in folder.split("/")):
        raise UserError(f"name: {template!r} gives {folder!r}, not a folder inside the sweep's output folder")
    return folder


def unique_folders(folders: list[str]) -> list[str]:
    """Each run a folder of its own: a folder named again gets ``_2``, ``_3`` ... the
    first suffix that no other run's folder has, names compared as file systems that
    ignore case compare them."""
    own = {f.casefold() for f in folders}
    used: set[str] = set()
    out = []
    for folder in folders:
        name, n = folder, 1
        while name.casefold() in used or (name != folder and name.casefold() in own):
            n += 1
            name = f"{folder}_{n}"
        used.add(name.casefold())
        out.append(name)
    return out


def load_sweep(path: Path) -> SweepSpec:
    """Read and validate a sweep file (one :class:`UserError` line per problem)."""
    data = read_yaml(path, "a sweep names a base run spec and a grid")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a sweep is a mapping (base or spec, grid, output, name, resources)")
    try:
        sweep = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(*[f"{path}: {'.'.join(map(str, e['loc'])) or '(top level)'}: {error_message(e)}"
                          for e in exc.errors()]) from None
    if sweep.base is not None and not sweep.base.is_absolute():
        sweep.base = Path(path).parent / sweep.base
    if sweep.output is None:
        sweep.output = Path("runs") / Path(path).stem
    return sweep


def expand(sweep: SweepSpec, reg: Registry, source: str = "sweep") -> list[Run]:
    """Every run of the grid, validated and checked: all problems of all runs are
    reported together, one line each, before anything runs."""
    base = sweep.spec if sweep.spec is not None else read_yaml(sweep.base, "a run spec")
    if not isinstance(base, dict):
        raise UserError(f"{sweep.base or 'spec'}: the base run spec must be a mapping of sections")
    paths = list(sweep.grid)
    names = axis_names(paths)
    runs, problems = [], []
    grid = [dict(zip(paths, combo)) for combo in itertools.product(*sweep.grid.values())]
    for values, folder in zip(grid, unique_folders([_folder(sweep.name, values, names) for values in grid])):
        data = copy.deepcopy(base)
        try:
            for p, v in values.items():
                set_path(data, p, v)
            data["output"] = str(Path(sweep.output) / folder)
            spec = validate_spec(data, reg, f"{source}: run {folder}")
            check_spec(spec, reg, f"{source}: run {folder}")
        except UserError as exc:
            problems += [p if p.startswith(source) else f"{source}: run {folder}: {p}" for p in exc.problems]
            continue
        runs.append(Run(folder, values, data, spec))
    if problems:
        raise UserError(*dict.fromkeys(problems))
    return runs


@dataclass
class Outcome:
    """How one run of a sweep ended."""

    status: str  # complete | failed | skipped | interrupted
    time_s: float = 0.0
    error: str = ""
    failures: list[dict] = field(default_factory=list)


def write_index(sweep: SweepSpec, runs: list[Run], outcomes: dict[str, Outcome], source: str) -> Path:
    """``<output>/sweep.json``: the grid and every run's folder, values and outcome
    (rewritten as each run ends, so an interrupted sweep still says what finished)."""
    path = Path(sweep.output) / "sweep.json"
    atomic_write_json(path, {
        "sweep": source,
        "grid": sweep.grid,
        "runs": [{"folder": r.folder, "values": r.values,
                  **({"outcome": outcomes[r.folder].__dict__} if r.folder in outcomes else {"outcome": None})}
                 for r in runs],
    })
    return path


def run_sweep(sweep: SweepSpec, runs: list[Run], executor, source: str,
              notify: Callable[[Run, Outcome], None] = lambda run, outcome: None, progress=None) -> dict[str, Outcome]:
    """Run every run not already finished with ``executor``; ``notify`` hears of each
    run as it ends (skipped ones first). ``sweep.json`` is kept up to date throughout.
    One sweep at a time in an output folder: a second is refused (a :class:`UserError`
    naming the first) before it writes anything, rather than finding the first one's
    runs in use and calling them failed."""
    with FolderLock(Path(sweep.output), elsewhere="give this sweep another output folder (output: in the sweep file)"):
        return _run_sweep(sweep, runs, executor, source, notify, progress)


def _run_sweep(sweep: SweepSpec, runs: list[Run], executor, source: str,
               notify: Callable[[Run, Outcome], None], progress) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    todo = []
    for run in runs:
        if run.done():
            outcomes[run.folder] = Outcome("skipped")
            notify(run, outcomes[run.folder])
        else:
            todo.append(run)
    write_index(sweep, runs, outcomes, source)

    def done(run: Run, outcome: Outcome) -> None:
        outcomes[run.folder] = outcome
        write_index(sweep, runs, outcomes, source)
        notify(run, outcome)

    try:
        executor.run(todo, done, progress)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the runs under way said so (executors), the rest never began
        from .engine import interruption

        for run in todo:
            outcomes.setdefault(run.folder, Outcome("interrupted", error=f"not started ({interruption(exc)})"))
        write_index(sweep, runs, outcomes, source)
        raise
    return outcomes
