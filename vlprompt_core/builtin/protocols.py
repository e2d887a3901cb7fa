"""The four standard protocols (rules as in the CoOp/CoCoOp reference code).

* ``few_shot``: K shots per class from train, val = min(K, 4) per class, scored on test.
* ``base2novel``: few-shot sample over all classes first; base = the first
  ceil(n/2) labels, novel = the rest, each relabelled from 0; train on base, score
  base and novel separately, each under its own classifier; H = 2BN/(B+N).
* ``cross_dataset``: train on the source (all classes), score each target's test split.
* ``domain_generalisation``: same mechanics, targets are shifted versions of the source.
"""

from __future__ import annotations

import math
from dataclasses import replace

from pydantic import Field

from .. import hookimpl
from ..api import ClassSet, DatasetRef, EvalSet, Item, Options, Plan, ProtocolContext, ProtocolEntry
from ..data import sample_few_shot
from ..errors import UserError


class FewShotOptions(Options):
    shots: int = Field(16, ge=1, description="labelled images per class (K)")


class TransferOptions(FewShotOptions):
    targets: list[DatasetRef] = Field(min_length=1, description="datasets scored with the source-trained prompts")


def harmonic_mean(base: float, novel: float) -> float:
    """H = 2BN / (B + N) (0 when both are 0)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def _shots(ctx: ProtocolContext, shots: int) -> tuple[list[Item], list[Item]]:
    """The few-shot train and val samples: K and min(K, 4) per class, keyed by (dataset, K, seed)."""
    ds = ctx.dataset
    if not ds.train:
        raise UserError(
            f"dataset {ds.name!r} has no training images (its train split is empty); a test-only dataset "
            "(e.g. the ImageNet variants) can only be a target of cross_dataset or domain_generalisation"
        )
    train = sample_few_shot(ds.train, shots, f"{ds.name}:train:{shots}:{ctx.seed}")
    val = sample_few_shot(ds.val, min(shots, 4), f"{ds.name}:val:{shots}:{ctx.seed}")
    return train, val


def _sample(train: list[Item], val: list[Item]) -> dict:
    return {
        "train": [[str(it.path), it.label] for it in train],
        "val": [[str(it.path), it.label] for it in val],
    }


def few_shot_plan(opts: FewShotOptions, ctx: ProtocolContext) -> Plan:
    train, val = _shots(ctx, opts.shots)
    ds = ctx.dataset
    return Plan(train, val, ds.classes, [EvalSet("test", ds.test, ds.classes)], _sample(train, val))


def split_base_novel(n_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first ceil(n/2) labels, novel = the rest."""
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def subsample(items: list[Item], labels: list[int]) -> list[Item]:
    """Keep the items whose label is in ``labels``, relabelled 0..len(labels)-1 in order."""
    new = {old: i for i, old in enumerate(labels)}
    return [replace(it, label=new[it.label]) for it in items if it.label in new]


def _subclasses(classes: ClassSet, labels: list[int]) -> ClassSet:
    """The classes at ``labels``, with the dataset's templates and ensemble."""
    return replace(classes, names=[classes.names[i] for i in labels])


def base2novel_plan(opts: FewShotOptions, ctx: ProtocolContext) -> Plan:
    ds = ctx.dataset
    train, val = _shots(ctx, opts.shots)
    base, novel = split_base_novel(len(ds.classes))
    base_classes = _subclasses(ds.classes, base)
    return Plan(
        subsample(train, base),
        subsample(val, base),
        base_classes,
        [
            EvalSet("base", subsample(ds.test, base), base_classes),
            EvalSet("novel", subsample(ds.test, novel), _subclasses(ds.classes, novel)),
        ],
        _sample(train, val),
    )


def base2novel_summary(opts, acc: dict[str, float]) -> dict[str, float]:
    return {"base": acc["base"], "novel": acc["novel"], "H": harmonic_mean(acc["base"], acc["novel"])}


def transfer_plan(opts: TransferOptions, ctx: ProtocolContext) -> Plan:
    ds = ctx.dataset
    train, val = _shots(ctx, opts.shots)
    evals = [EvalSet(ds.name, ds.test, ds.classes)]
    for section in opts.targets:
        target = ctx.load_dataset(section)
        name = target.name
        while name in {e.name for e in evals}:
            name += "'"
        evals.append(EvalSet(name, target.test, target.classes))
    return Plan(train, val, ds.classes, evals, _sample(train, val))


def transfer_summary(opts, acc: dict[str, float]) -> dict[str, float]:
    names = list(acc)
    targets = names[1:]
    out = {names[0] + " (source)": acc[names[0]]}
    out.update({t: acc[t] for t in targets})
    out["average"] = sum(acc[t] for t in targets) / len(targets)
    return out


@hookimpl
def vlprompt_protocols() -> list[ProtocolEntry]:
    return [
        ProtocolEntry("few_shot", FewShotOptions, few_shot_plan, lambda o, a: {"accuracy": a["test"]},
                       "K shots per class, scored on the test split"),
        ProtocolEntry("base2novel", FewShotOptions, base2novel_plan, base2novel_summary,
                       "train on the first half of the classes, score base and novel; H = 2BN/(B+N)",
                       unseen_classes=True),
        ProtocolEntry("cross_dataset", TransferOptions, transfer_plan, transfer_summary,
                       "train on the source dataset, score each target dataset"),
        ProtocolEntry("domain_generalisation", TransferOptions, transfer_plan, transfer_summary,
                       "train on the source, score shifted versions of it"),
    ]
