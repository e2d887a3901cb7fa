"""The file ``vlprompt export`` writes: one safetensors file that holds a trained
classifier whole, and the model card beside it.

Tensors: ``trained.<name>`` for each trainable tensor of the method (none for
zero-shot CLIP) and, for a method whose text features depend on neither the image nor
chance, ``text_features`` (``[C, D]``, L2-normalised: an image's class scores are
``logit_scale * normalize(image feature) @ text_features.T``). Metadata: ``format``
(:data:`FORMAT`), ``vlprompt`` (the JSON :class:`Head`: method, label, seed, options,
the backbone's section and the sha256 of its weights, the classes with their
templates, the run's settings, where it came from and how it scored) and ``sha256``
(:func:`digest` of all the rest: a file changed afterwards is refused)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open

from .. import __version__
from ..errors import UserError
from ..features import weights_hash
from ..results import atomic_file, package_versions
from ..trainstate import atomic_save
from ..engine import learned_tensors

#: What the ``format`` metadata of an export says; another value is refused.
FORMAT = "vlprompt-classifier/1"


class ExportedClasses(BaseModel):
    model_config = ConfigDict(extra="forbid")

    names: list[str]
    templates: list[str]
    ensemble: list[str] | None = None


class Head(BaseModel):
    """What an export says of itself (its ``vlprompt`` metadata)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    label: str
    seed: int
    options: dict[str, Any]  # as the spec and recipe asked
    used: dict[str, Any] | None = None  # as the method settled them on the backbone (it is built with these)
    backbone: dict[str, Any]  # the run spec's backbone section
    backbone_sha256: str  # of the backbone's weights (:func:`~vlprompt_core.features.weights_hash`)
    classes: ExportedClasses
    train: dict[str, Any]  # the method's resolved train settings (precision, batch size, unreadable images...)
    about: dict[str, Any]  # where it came from, how it scored, what it cost, versions


@dataclass
class Export:
    head: Head
    trained: dict[str, torch.Tensor]
    text_features: torch.Tensor | None


def digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the metadata (but ``sha256``) and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_export(path: Path) -> Export:
    """The export at ``path``, checked: a vlprompt export of this format, unchanged since
    it was written (:func:`digest`); anything else is a one-line :class:`UserError`."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a file 'vlprompt export' wrote (not a safetensors file: {detail})") from None
    if meta.get("format") != FORMAT:
        if {"method", "options", "seed"} <= set(meta):
            raise UserError(f"{path}: a checkpoint of a run, not an export: give its results folder, or make one "
                            "file of it with 'vlprompt export'")
        said = f"format {meta['format']!r}, not {FORMAT!r}" if "format" in meta else "no vlprompt metadata"
        raise UserError(f"{path}: not a file 'vlprompt export' wrote ({said})")
    if meta.get("sha256") != digest(meta, tensors):
        raise UserError(f"{path}: its content does not match the checksum it was exported with (changed since "
                        "'vlprompt export' wrote it); export it again")
    try:
        head = Head.model_validate_json(meta.get("vlprompt", ""))
    except ValidationError as exc:
        raise UserError(f"{path}: its vlprompt metadata is malformed ({exc.errors()[0]['msg']})") from None
    trained = {name.removeprefix("trained."): t for name, t in tensors.items() if name.startswith("trained.")}
    return Export(head, trained, tensors.get("text_features"))


def write_export(clf, out: Path) -> tuple[Path, Path]:
    """Write ``clf`` (a :class:`~.classifier.Classifier`) to ``out`` and its model card
    beside it (``out`` with ``.md``); returns both paths."""
    about = clf.about
    try:
        text = clf.text_features()
    except UserError:
        text = None  # its text depends on the image or on chance
    classes = clf.class_set
    keep = {k: v for k, v in about.items() if k not in {"label", "method", "seed", "options", "used", "train",
                                                        "backbone", "backbone_description"}}
    head = Head(method=about["method"], label=about["label"], seed=clf.seed, options=about["options"],
                used=about.get("used"), backbone=about["backbone"], backbone_sha256=weights_hash(clf.backbone),
                classes=ExportedClasses(names=list(classes.names), templates=list(classes.templates),
                                        ensemble=classes.ensemble),
                train=clf.settings.model_dump(mode="json"),
                about={**keep, "backbone_description": about.get("backbone_description"),
                       "exported_with": {"vlprompt": __version__, **package_versions()}})
    tensors = {f"trained.{name}": p.detach().cpu().contiguous() for name, p in learned_tensors(clf.method).items()}
    if text is not None:
        tensors["text_features"] = text.cpu().contiguous()
    meta = {"format": FORMAT, "vlprompt": head.model_dump_json()}
    meta["sha256"] = digest(meta, tensors)
    atomic_save(tensors, out, meta)
    card = out.with_suffix(".md")
    with atomic_file(card) as tmp:
        tmp.write_text(model_card(head, out, sum(t.numel() for n, t in tensors.items() if n.startswith("trained."))))
    return out, card


# ---------------------------------------------------------------- model card


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _section(d: dict[str, Any] | None, skip: tuple[str, ...] = ("name",)) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (d or {}).items() if k not in skip and v is not None) or "defaults"


def model_card(head: Head, file: Path, trainable: int) -> str:
    """Markdown: what the classifier is, how it scored, what it cost, how it was trained,
    with which versions, and how to use it."""
    a = head.about
    backbone, dataset, protocol = head.backbone, a.get("dataset") or {}, a.get("protocol") or {}
    names = head.classes.names
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    lines = [
        f"# {head.label}: {head.method} on {dataset.get('name', '?')} ({backbone.get('model', backbone.get('name'))})",
        "",
        f"A classifier exported by `vlprompt export` from `{a.get('source', '?')}` (seed {head.seed}), in "
        f"`{file.name}` (safetensors).",
        "",
        "| | |",
        "|---|---|",
        f"| method | {_cell(head.method)} (label {_cell(head.label)}; options: {_cell(_section(head.options))}"
        + (f"; uses {_cell(_section(head.used))} on this backbone" if head.used not in (None, head.options) else "")
        + ") |",
        f"| backbone | {_cell(backbone.get('name'))}: {_cell(_section(backbone))} "
        f"({_cell(a.get('backbone_description') or '')}); weights sha256 `{head.backbone_sha256[:16]}…` |",
        f"| dataset | {_cell(dataset.get('name', '?'))} ({_cell(_section(dataset))}) |",
        f"| protocol | {_cell(protocol.get('name', '?'))} ({_cell(_section(protocol))}) |",
        f"| seed | {head.seed} |",
        f"| classes | {len(names)}: {_cell(shown)} |",
        f"| templates | {_cell(' / '.join(head.classes.templates))} |",
        f"| trainable parameters | {trainable:,} |",
        "",
        "## Accuracy",
        "",
        "Top-1 accuracy (%) on the run's evaluation splits, each under its own classes.",
        "",
        "| metric | this seed | mean ± std over the run's seeds |",
        "|---|---|---|",
    ]
    scores, summary = a.get("scores") or a.get("accuracy") or {}, a.get("summary") or {}
    for metric in dict.fromkeys([*scores, *summary]):
        mine = f"{scores[metric]:.2f}" if metric in scores else "–"
        pooled = summary.get(metric)
        pooled = f"{pooled['mean']:.2f} ± {pooled['std']:.2f}" if isinstance(pooled, dict) else "–"
        lines.append(f"| {_cell(metric)} | {mine} | {pooled} |")
    cost = a.get("cost") or {}
    times = cost.get("time_s") or {}
    lines += ["", "## Cost", "", "| | |", "|---|---|"]
    lines += [f"| time: {_cell(k)} | {v:.1f} s |" for k, v in times.items() if isinstance(v, (int, float))]
    if cost.get("peak_memory_mb") is not None:
        lines.append(f"| peak memory ({_cell(cost.get('memory', ''))}) | {cost['peak_memory_mb']:,.0f} MB |")
    lines += ["", "## Recipe", "", "Training settings (spec > method recipe > defaults: where each came from).", "",
              "| setting | value | from |", "|---|---|---|"]
    sources = a.get("sources") or {}
    for k, v in head.train.items():
        lines.append(f"| {_cell(k)} | {_cell(v)} | {_cell(sources.get(f'train.{k}', ''))} |")
    for k, v in head.options.items():
        lines.append(f"| {_cell(k)} | {_cell(v)} | {_cell(sources.get(k, ''))} |")
    trained_with = a.get("versions") or {}
    exported_with = a.get("exported_with") or {}
    lines += ["", "## Versions", "", "| package | trained with | exported with |", "|---|---|---|"]
    for pkg in dict.fromkeys([*trained_with, *exported_with]):
        lines.append(f"| {_cell(pkg)} | {_cell(trained_with.get(pkg, '–'))} | {_cell(exported_with.get(pkg, '–'))} |")
    lines += [
        "", "## Use", "",
        "```bash",
        f"vlprompt predict {file.name} IMAGES...          # a table; --format csv|json, -o FILE, --top-k K",
        "```", "",
        "```python",
        "import vlprompt",
        "",
        f'clf = vlprompt.load("{file.name}")   # checks the backbone\'s weights against the hash above',
        'print(clf.predict(["image.png"]).names)',
        "```", "",
    ]
    return "\n".join(lines)
