"""What a loaded dataset must be for its results to be trusted, and what they depend on.

* Class names that read alike in a prompt (``red circle`` / ``red_circle``, ``cat`` /
  ``Cat`` / ``cat ``: CLIP's tokenizer ignores case, reads ``_`` as a space -- see
  :func:`~vlprompt_core.data.paths.prompt_name` -- and extra spaces) would be separate
  classes with one prompt. A class list that comes from a user's own data (class
  folders, the class values of a CSV or JSON list, ``classnames``) may not have two
  such names (:func:`user_classes`). The class list of a dataset spec file or a
  plug-in is the benchmark's as its authors published it and is taken as written
  (ImageNet's, as CoOp and every paper since used it, names ``missile`` and
  ``sunglasses`` twice each); ``vlprompt data check`` shows such names.
* :func:`dataset_problems`: what every loaded dataset must be, whatever its layout or
  plug-in -- at least two classes, images for every class, labels in range. A run
  refuses a dataset that is not (:func:`check_dataset`), ``vlprompt validate`` and
  ``vlprompt data check`` say why.
* :func:`check_plan`: what a protocol plans to train and score has two classes or
  more too (base-to-novel halves of a 3-class dataset would score one class: 100 %).
* :func:`data_fingerprint`: what loaded datasets hold (names, prompts, the items of
  each split), cheaply: part of every result's key, so a result is never taken for
  data that changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from numbers import Integral

from ..api import ClassSet, DatasetSplits, Plan
from ..errors import UserError
from .paths import prompt_name
from .scan import SPLITS, _first


def class_key(name: str) -> str:
    """A class name as CLIP reads it in a prompt: ``_`` as a space, extra spaces and case ignored."""
    return " ".join(prompt_name(str(name)).split()).casefold()


def alike_names(names: list[str]) -> list[list[int]]:
    """Groups (indices into ``names``) of two or more names that read alike (:func:`class_key`)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        groups[class_key(name)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def alike_problem(names: list[str], what: str, fix: str) -> str | None:
    """One line naming the names of ``names`` (``what`` says what they are and where)
    that read alike in a prompt, or None."""
    groups = alike_names(names)
    if not groups:
        return None
    shown = [names[i] for i in groups[0]]
    if len(set(shown)) == 1:
        head = f"{shown[0]!r} is listed {len(shown)} times (labels {', '.join(map(str, groups[0]))})"
    else:
        listed = ", ".join(repr(n) for n in shown[:-1]) + f" and {shown[-1]!r}"
        head = (f"{listed} read the same in a prompt ({class_key(shown[0])!r}: case, '_' and extra spaces do "
                "not count)")
    more = ""
    if len(groups) > 1:
        more = f" ({len(groups)} such groups: {_first([' / '.join(repr(names[i]) for i in g) for g in groups])})"
    return f"{what}: {head}, so they would be separate classes with one prompt{more}; {fix}"


def user_classes(names: list[str], templates: list[str], ensemble: list[str] | None, what: str,
                 fix: str) -> ClassSet:
    """The classes of a user's own data: ``names`` as prompts write them; names that
    read alike are a :class:`UserError` (see :func:`alike_problem`)."""
    problem = alike_problem([str(n) for n in names], what, fix)
    if problem:
        raise UserError(problem)
    return ClassSet([prompt_name(str(n)) for n in names], list(templates), ensemble)


def class_count_problem(name: str, names: list[str]) -> str | None:
    """One line when a dataset called ``name`` has fewer than two classes, or None."""
    if len(names) >= 2:
        return None
    which = f" ({names[0]!r})" if names else ""
    return (f"{name}: {len(names)} class{'' if len(names) == 1 else 'es'}{which}; a classifier needs at least 2 "
            "classes (with one, every image is scored right: 100 %): add the other classes and their images")


def dataset_problems(ds: DatasetSplits) -> list[str]:
    """What makes a loaded dataset's results untrustworthy, one line each: fewer than
    two classes (with one, every image is scored right), image labels outside the
    class list, classes without any image (they still draw predictions)."""
    names, n = ds.classes.names, len(ds.classes)
    problems = [p for p in [class_count_problem(ds.name, names)] if p]
    seen = {it.label for split in SPLITS for it in getattr(ds, split)}
    outside = sorted((label for label in seen if not (isinstance(label, Integral) and 0 <= label < n)), key=str)
    if outside:
        problems.append(f"{ds.name}: image label(s) {_first(outside)} outside the class list (labels 0..{n - 1})")
    empty = [repr(names[i]) for i in range(n) if i not in seen]
    if empty:
        problems.append(f"{ds.name}: {len(empty)} of the {n} classes have no images: {_first(empty)}; a class "
                        "without images still draws predictions (accuracy falls): add its images, or leave it "
                        "out of the class list")
    return problems


def check_dataset(ds: DatasetSplits) -> DatasetSplits:
    """``ds`` if it has none of :func:`dataset_problems`, else a :class:`UserError`."""
    problems = dataset_problems(ds)
    if problems:
        raise UserError(*problems)
    return ds


def check_plan(plan: Plan, where: str) -> Plan:
    """``plan`` if it trains and scores classifiers of two classes or more, else a
    :class:`UserError` (one line per set of fewer classes) naming ``where`` it comes from."""
    sets = [("trains on", "its training classes", plan.classes)]
    sets += [("scores", f"evaluation set {e.name!r}", e.classes) for e in plan.evals]
    problems = [f"{where}: {what} {len(c)} class{'' if len(c) == 1 else 'es'} ({_first([repr(n) for n in c.names])}) "
                f"in {which}; a classifier needs at least 2 classes (with one, every image is scored right: 100 %): "
                "use a dataset with more classes" for what, which, c in sets if len(c) < 2]
    if problems:
        raise UserError(*problems)
    return plan


def data_fingerprint(datasets: list[DatasetSplits]) -> str:
    """What ``datasets`` hold, as a short hash: each one's name, class names,
    templates and prompt ensemble, and the items of each split in order (label and
    path, the path relative to the folder all its items share: a dataset moved or
    copied elsewhere is the same data). Nothing is read from disk: an image changed
    in place under the same name is not noticed (the feature cache, which hashes file
    sizes and times, does notice it)."""
    h = hashlib.sha256()
    for ds in datasets:
        h.update(json.dumps([ds.name, ds.classes.names, ds.classes.templates, ds.classes.ensemble]).encode())
        paths = {split: [str(it.path) for it in getattr(ds, split)] for split in SPLITS}
        every = [p for split in SPLITS for p in paths[split]]
        base = os.path.dirname(os.path.commonprefix([min(every), max(every)])) if every else ""
        cut = len(base)
        for split in SPLITS:
            labels = (it.label for it in getattr(ds, split))
            h.update(f"\n{split}\n".encode())
            h.update("\n".join(f"{label}\t{p[cut:]}" for label, p in zip(labels, paths[split])).encode())
    return h.hexdigest()[:16]
