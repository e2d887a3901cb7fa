"""``vlprompt predict`` and ``vlprompt export``: what a run trained, used on images
(:mod:`vlprompt_core.inference`)."""

from __future__ import annotations

import csv
import io
import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import StorageError, UserError, storage_problem
from .common import _bars, _fail, _one_line, _print_whole, _registry, _reporter, app, err, out

SOURCE_HELP = "a results folder 'vlprompt run' wrote (or its results.json), or a file 'vlprompt export' wrote"
#: Suffixes that make a --classes value a file name (one that is not there is an error, not a class name).
CLASS_FILE_SUFFIXES = {".txt", ".csv", ".lst", ".list", ".names"}


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


class Unreadable(str, Enum):
    error = "error"
    skip = "skip"


def image_paths(args: list[str]) -> list[Path]:
    """The image files ``args`` name: files as given, every image file below a folder
    (by suffix, recursively, sorted), and the files a quoted glob matches."""
    import glob

    from ..data import IMAGE_SUFFIXES

    found: list[Path] = []
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise UserError(f"{arg}: no image files in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif path.exists():
            found.append(path)
        elif any(c in arg for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"{arg}: no file matches")
            found += matches
        else:
            raise UserError(f"{arg}: no such file or folder")
    return found


def class_names(value: str) -> list[str]:
    """``--classes``: a text file of names (one a line; blank lines and ``#`` comments
    skipped), or names separated by commas."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--classes: {path}: cannot be read as text ({getattr(exc, 'strerror', None) or exc})") \
                from None
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if "," not in value and path.suffix.lower() in CLASS_FILE_SUFFIXES:
        raise UserError(f"--classes: {value}: file not found (give a file of names, one a line, or names separated "
                        "by commas)")
    return [name.strip() for name in value.split(",") if name.strip()]


def _table(clf, predictions, k: int) -> Table:
    k = min(k, len(predictions.classes))
    table = Table(title=f"{clf.label} seed {clf.seed} ({clf.about['method']}): {len(predictions)} images, "
                        f"{len(clf.classes)} classes", title_justify="left")
    table.add_column("image", overflow="fold")
    if k == 1:
        table.add_column("class")
        table.add_column("score", justify="right")
    else:
        for rank in range(1, k + 1):
            table.add_column(f"#{rank}")
    for source, best in zip(predictions.sources, predictions.top(k)):
        if k == 1:
            table.add_row(Text(source), Text(best[0][0]), f"{best[0][1]:.3f}")
        else:
            table.add_row(Text(source), *[Text(f"{name} ({score:.3f})") for name, score in best])
    return table


def _csv(predictions, k: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    k = min(k, len(predictions.classes))
    writer.writerow(["path", *[f"{what}_{rank}" for rank in range(1, k + 1) for what in ("class", "score")]])
    for source, best in zip(predictions.sources, predictions.top(k)):
        writer.writerow([source, *[v for name, score in best for v in (name, f"{score:.6f}")]])
    return buffer.getvalue()


def _json(clf, predictions, k: int) -> str:
    about = clf.about
    data = {
        "classifier": {"source": about["source"], "method": about["method"], "label": about["label"],
                       "seed": clf.seed, "classes": clf.classes},
        "predictions": predictions.records(k),
        "unreadable": [{"path": p, "reason": r} for p, r in predictions.unreadable.items()],
    }
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _write(path: Path, text: str) -> None:
    from ..results import atomic_file

    try:
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise StorageError(storage_problem(exc, "give -o another file")) from None


@app.command()
def predict(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    images: list[str] = typer.Argument(..., help="image files, folders (every image file in them) or quoted globs"),
    method: str = typer.Option(None, "--method", "-m", help="the method's label in the run (needed when it "
                               "trained several)"),
    seed: int = typer.Option(None, "--seed", help="which seed's prompts (needed when the run has several)"),
    classes: str = typer.Option(None, "--classes", help="other class names to predict over: a text file, one "
                                "name a line, or names separated by commas (default: the classes it was trained on)"),
    top_k: int = typer.Option(1, "--top-k", "-k", min=1, help="classes shown per image, best first"),
    fmt: Format = typer.Option(None, "--format", "-f", help="table (default), csv or json; with -o, taken "
                               "from the file's suffix when not given"),
    output: Path = typer.Option(None, "--output", "-o", help="write the predictions to this file"),
    unreadable: Unreadable = typer.Option(None, "--unreadable", help="an image file that cannot be read: stop "
                                          "(error) or name it and go on (skip); default: the run's "
                                          "train.unreadable_images"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... (auto: CUDA when there is one)"),
):
    """Classify images with what a run trained: a method's prompts for one seed, from
    its results folder, or a file 'vlprompt export' wrote. Prints a table (image, the
    top classes and their scores, probabilities over the classes), or writes CSV or
    JSON.

    Images are scored as the run scored its test images (the backbone's test transform,
    the run's precision). --classes scores other class names where the method allows
    it (a learned context does; class-specific contexts refuse). Zero-shot CLIP in the
    results works too."""
    from ..inference import load
    from ..inference.load import source_kind

    if fmt is None:
        suffix = output.suffix.lower().lstrip(".") if output is not None else ""
        fmt = Format(suffix) if suffix in ("csv", "json") else Format.table
    try:
        source_kind(source)
        paths = image_paths(images)
        clf = load(source, method, seed, class_names(classes) if classes is not None else None, device, _registry())
        policy = unreadable.value if unreadable is not None else None
        if len(paths) > clf.settings.eval_batch_size:  # bars only where it takes a while
            with _bars() as bars:
                predictions = clf.predict(paths, policy, progress=_reporter(bars))
        else:
            predictions = clf.predict(paths, policy)
        for path, reason in predictions.unreadable.items():
            err.print(Text.assemble(("skipped:", "yellow"), " ", _one_line(f"{path}: {reason}")), soft_wrap=True)
        if fmt is Format.table:
            table = _table(clf, predictions, top_k)
            if output is None:
                _print_whole(out, table)
                return
            buffer = io.StringIO()
            _print_whole(Console(file=buffer, width=100, no_color=True), table)
            text = buffer.getvalue()
        else:
            text = _csv(predictions, top_k) if fmt is Format.csv else _json(clf, predictions, top_k)
        if output is None:
            out.file.write(text)
            return
        _write(output, text)
    except UserError as exc:
        _fail(exc)
    err.print(Text(f"predictions: {output} ({len(predictions)} images)"), soft_wrap=True)


@app.command("export")
def export_(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="the file to write (safetensors); the model card goes "
                                "beside it, with .md"),
    method: str = typer.Option(None, "--method", "-m", help="the method's label in the run (needed when it "
                               "trained several)"),
    seed: int = typer.Option(None, "--seed", help="which seed's prompts (needed when the run has several)"),
):
    """Write one trained classifier (a method's prompts for one seed) to one
    self-contained safetensors file, with a model card beside it (Markdown: method,
    backbone, dataset, protocol, accuracy, cost, recipe, versions).

    The file holds the trained tensors, the method and its options, the backbone's
    name, pretrained reference and a hash of its weights, the class names and
    templates, and the class text features where they depend on neither the image nor
    chance. 'vlprompt predict' and vlprompt.load take it; a file changed since, or a
    backbone whose weights hash otherwise, is refused."""
    from ..inference import export

    try:
        file, card = export(source, output, method, seed, registry=_registry())
    except UserError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(StorageError(storage_problem(exc, "give -o another file")))
    out.print(Text(f"exported: {file} (model card: {card})"), soft_wrap=True)
