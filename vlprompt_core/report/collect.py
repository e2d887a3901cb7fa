"""Reading a study: every finished (method, seed) pair of the ``results.json`` files
under the folders given (:func:`read_study`), its group (what makes numbers
comparable) and the name of its row in a table (:func:`row_names`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class Group:
    """What makes numbers comparable: one column block of a table."""

    protocol: str
    dataset: str
    backbone: str
    shots: int | None
    targets: tuple[str, ...]


@dataclass
class Pair:
    """One finished (method, seed) pair of a results file."""

    group: Group
    label: str
    name: str
    key: str
    seed: int
    summary: dict[str, float]
    cost: dict | None
    folder: str  # the results folder, relative to the folder given on the command line ("" if that one)
    root: str = ""  # the name of the folder given on the command line


@dataclass
class Study:
    files: list[Path] = field(default_factory=list)
    incomplete: list[tuple[Path, str]] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    duplicates: int = 0


def _text(value, what: str) -> str:
    """``value`` when it is text (names, keys); a file holding something else is not
    what ``vlprompt run`` writes (TypeError)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} is {json.dumps(value)[:60]}, not text")
    return value


def _backbone(section: dict) -> str:
    """The backbone's model (a model config file by its stem), else its name."""
    model = _text(section.get("model") or section["name"], "backbone.model")
    return Path(model).stem if model.endswith(".json") else model


def _group(spec: dict) -> Group:
    protocol = spec["protocol"]
    targets = tuple(_text(t["name"], "a target's name") for t in protocol.get("targets") or ())
    shots = protocol.get("shots")
    if shots is not None and type(shots) is not int:
        raise TypeError(f"protocol.shots is {json.dumps(shots)[:60]}, not a number of shots")
    return Group(_text(protocol["name"], "protocol.name"), _text(spec["dataset"]["name"], "dataset.name"),
                 _backbone(spec["backbone"]), shots, targets)


def _pairs(record: dict, folder: str, root: str = "") -> list[Pair]:
    """The pairs of a results file's content; what is not the shape ``vlprompt run``
    writes raises (KeyError, TypeError, ValueError), so that the file is skipped whole."""
    group = _group(record["spec"])
    pairs = [Pair(group, _text(r["method"], "a run's method"), _text(r.get("name", r["method"]), "a run's name"),
                  _text(r["key"], "a run's key"), int(r["seed"]),
                  {_text(k, "a metric"): float(v) for k, v in r["summary"].items()}, r.get("cost"), folder, root)
             for r in record["runs"]]
    metrics = {frozenset(p.summary) for p in pairs}
    if len(metrics) > 1 or frozenset() in metrics:
        names = sorted(", ".join(sorted(m)) or "none" for m in metrics)
        raise ValueError(f"its runs do not all have the same metrics: {' / '.join(names)}")
    return pairs


def _folder(path: Path, root: Path) -> tuple[str, str]:
    """``(results folder relative to root, or "" if root itself; root's name)``."""
    relative = os.path.relpath(path.parent, root)
    return ("" if relative == os.curdir else relative), (Path(os.path.abspath(root)).name or str(root))


def results_files(dirs: list[Path]) -> list[tuple[Path, Path]]:
    """``(folder given, results.json)`` for every results file under ``dirs``
    (``results.<hash>.json`` files set aside by the engine are not read)."""
    found = []
    for folder in dirs:
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: not a folder")
        found += [(Path(folder), path) for path in sorted(Path(folder).rglob("results.json"))]
    return found


def read_study(dirs: list[Path], warn: Callable[[str], None]) -> Study:
    """Every finished pair in the results files under ``dirs``; a file that is not
    vlprompt results is one warning. No results at all is a :class:`UserError`."""
    study, seen, metrics = Study(), set(), {}
    for root, path in results_files(dirs):
        try:
            record = json.loads(path.read_text())
            pairs = _pairs(record, *_folder(path, root))
            for pair in pairs:  # a group's numbers are one table: the same metrics in every file
                if set(pair.summary) != set(metrics.get(pair.group, pair.summary)):
                    raise ValueError(f"its metrics {sorted(pair.summary)} are not those of the other results of "
                                     f"{pair.group.protocol} on {pair.group.dataset}: {sorted(metrics[pair.group])}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warn(f"{path}: not a vlprompt results file, skipped ({type(exc).__name__}: {exc})")
            continue
        for pair in pairs:
            metrics.setdefault(pair.group, pair.summary)
        study.files.append(path)
        if record.get("status") != "complete":
            study.incomplete.append((path, str(record.get("status"))))
        for pair in pairs:
            if (pair.group, pair.key, pair.seed) in seen:
                study.duplicates += 1
                continue
            seen.add((pair.group, pair.key, pair.seed))
            study.pairs.append(pair)
    if not study.pairs:
        where = ", ".join(str(d) for d in dirs)
        raise UserError(f"no finished results under {where} (looked for results.json files written by 'vlprompt run')")
    return study


def row_names(pairs: list[Pair]) -> dict[int, str]:
    """Each pair's row name. A row of a group is one (label, settings key): named by its
    label, or ``label [folder]`` where one label of a group has several settings keys
    (e.g. a sweep over learning rates): the folder its results are in, relative to the
    folder given on the command line, else the name of the folder given. Rows of the
    same name in different groups line up in one table row (a method's datasets); two
    rows of one group never share a name: should settings still get the same name
    (folders of the same name, a label written like a generated one), the settings key
    is added to each, so different settings are never pooled."""
    keys: dict[tuple[Group, str], set[str]] = {}
    rows: dict[tuple[Group, str, str], list[Pair]] = {}
    for p in pairs:
        keys.setdefault((p.group, p.label), set()).add(p.key)
        rows.setdefault((p.group, p.label, p.key), []).append(p)
    named = {}
    for (group, label, key), mine in rows.items():
        named[(group, label, key)] = label if len(keys[(group, label)]) == 1 else f"{label} [{_where(mine)}]"
    for _ in range(len(named)):  # each round lengthens the names that clash: a few at most
        by_name: dict[tuple[Group, str], list[tuple[Group, str, str]]] = {}
        for row, name in named.items():
            by_name.setdefault((row[0], name), []).append(row)
        clashes = [row for same in by_name.values() if len(same) > 1 for row in same]
        if not clashes:
            break
        for row in clashes:
            named[row] = f"{named[row]} ({row[2]})"
    return {id(p): named[row] for row, mine in rows.items() for p in mine}


def _where(pairs: list[Pair]) -> str:
    """The folder of ``pairs`` (one settings key of a label): the folder shared by their
    results files, relative to the folders given, else with the given folder's name in
    front (results directly in the folders given), else the names of the folders given."""
    relative = {p.folder for p in pairs}
    qualified = {f"{p.root}/{p.folder}" if p.folder else p.root for p in pairs}
    for folders in (relative, qualified):
        try:
            common = os.path.commonpath(sorted(folders))
        except ValueError:  # absolute beside relative: nothing in common
            common = ""
        if common and common != os.curdir:
            return common
    return ", ".join(sorted({p.root for p in pairs}))
