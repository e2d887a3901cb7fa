"""The engine against textbook mode, in one process, on the same model, data and seeds.

Textbook mode (:mod:`vlprompt_core.textbook`) computes what the reference code
computes the way it computes it: a 77-token text pass every step, text features
again for every test batch, test images encoded again by every method, CoCoOp one
image at a time. Every figure below is measured in this run; ratios are
textbook / engine (or first / second for the feature cache).

Sections (``--sections``, all by default):

* ``equal``   the same logits on a fixed batch (CoOp, CoCoOp; chunked text pass on
              and off), and the same accuracies after training with the same seeds
              and augmentation draws (the embedded tiny CLIP and world);
* ``steps``   CoOp training step and evaluation of a test split: time and peak
              memory, per class count and model;
* ``cache``   a test split evaluated twice with ``train.feature_cache``: first run
              against a second one in a fresh engine;
* ``views``   ``train.augment_views``: epoch time and accuracy against exact training
              (embedded world, base-to-novel);
* ``cocoop``  a CoCoOp training step at batch 32 against the per-image loop;
* ``run``     a whole ``method: all`` base-to-novel run (synthetic dataset), wall time.

``--smoke`` checks the machinery, not the figures: every section runs its code on the
tiny CLIP with small shapes, ``equal`` and ``views`` on a small synthetic dataset (8
classes, 4 training and 2 test images each) instead of the embedded one, and ``run``
with CoOp and BPL (BPL's textbook pairs estimated) over 2 seeds.

    python benchmarks/engine.py --smoke              # CI: every section, tiny CLIP, tiny data (seconds)
    python benchmarks/engine.py                      # tiny CLIP and ViT-B/16-sized, 100/500/1000 classes
    python benchmarks/engine.py --sections steps --classes 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from vlprompt_core.api import ClassSet, EvalSet, Item  # noqa: E402
from vlprompt_core.engine import Engine, forward, make_batch, make_optimizer, optimizer_groups, set_seed  # noqa: E402
from vlprompt_core.plugins import get_registry  # noqa: E402
from vlprompt_core.prompting import text_chunking  # noqa: E402
from vlprompt_core.spec import TrainSpec, validate_spec  # noqa: E402
from vlprompt_core.textbook import textbook  # noqa: E402

TINY = {"name": "open_clip", "model": "vlprompt_tiny", "pretrained": "embedded"}
VIT_B16 = {"name": "open_clip", "model": "ViT-B-16", "pretrained": None}  # random weights, ViT-B/16 sizes
MODES = ("textbook", "engine")


# ------------------------------------------------------------------ measuring


class PeakMemory:
    """Peak memory inside the block: peak allocated on CUDA; on CPU the process's
    resident set, sampled every millisecond by a thread (``peak_mb``: the whole
    process, weights included)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak = self.rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def mode(name: str, chunk="auto"):
    """``textbook`` or ``engine`` (with the engine's text chunking setting)."""
    with textbook(name == "textbook"), text_chunking(0 if name == "textbook" else chunk):
        yield


# ------------------------------------------------------------------ set-up

ADJECTIVES = ["red", "small", "wooden", "striped", "golden", "wild", "old", "spotted", "giant", "northern"]
NOUNS = ["fox", "teapot", "sports car", "mountain bike", "grand piano", "owl", "lighthouse", "tree frog",
         "umbrella", "espresso machine"]
PLACES = ["alpine", "coastal", "desert", "urban", "arctic", "tropical", "indoor", "garden", "forest"]


def class_names(n: int) -> list[str]:
    """``n`` distinct class names of 2 to 4 words, like a benchmark's (up to 1000)."""
    names = [f"{a} {b}" for b in NOUNS for a in ADJECTIVES]
    names += [f"{c} {name}" for c in PLACES for name in names]
    if n > len(names):
        raise SystemExit(f"at most {len(names)} classes")
    return names[:n]


def write_images(folder: Path, names: list[str], per_class: int, size: int = 64, seed: int = 0) -> list[Item]:
    """Random-texture PNGs, ``per_class`` per class: ``<folder>/<class>/<i>.png``."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    items = []
    for label, name in enumerate(names):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / name / f"{i}.png"
            if not path.exists():
                base = torch.rand(3, 1, 1, generator=g)
                pixels = (base + 0.3 * torch.rand(3, size, size, generator=g)).clamp(0, 1)
                Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(path)
            items.append(Item(path, label))
    return items


def small_dataset(folder: Path, n_classes: int = 8, train: int = 4, test: int = 2) -> dict:
    """``--smoke``: a synthetic ``folder`` dataset of ``n_classes`` classes, ``train``
    training, one validation and ``test`` test images per class (32 px); its ``dataset:``
    section."""
    names = class_names(n_classes)
    for split, per_class in (("train", train), ("val", 1), ("test", test)):
        write_images(folder / split, names, per_class, size=32, seed=len(split))
    return {"name": "folder", "path": str(folder)}


def make_engine(backbone_section: dict, output: Path, **train) -> Engine:
    spec = validate_spec({
        "backbone": backbone_section, "method": {"name": "coop"},
        "dataset": {"name": "embedded_objects"}, "protocol": {"name": "base2novel", "shots": 1},
        "train": {"seeds": [1], **train}, "output": str(output),
    }, get_registry())
    return Engine(spec, get_registry())


def build_backbone(section: dict, device: torch.device):
    reg = get_registry()
    entry = reg.get("backbone", section["name"])
    torch.manual_seed(0)
    options = entry.options.model_validate({k: v for k, v in section.items() if k != "name"})
    return entry.build(options).to(device)


def build_method(backbone, name: str, classes: list[str], **options):
    entry = get_registry().get("method", name)
    torch.manual_seed(0)
    return entry.build(backbone, ClassSet(classes), entry.options.model_validate(options))


def train_step(method, images, labels, optimizer) -> None:
    method.train()
    batch = make_batch(method, images, labels)
    loss = method.loss(forward(method, batch), batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# ------------------------------------------------------------------ sections


def section_equal(args, device, out: dict) -> None:
    """Same logits on a fixed batch; same accuracies after the same training."""
    bb = build_backbone(TINY, device)
    names = class_names(23)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, bb.image_size, bb.image_size, generator=g).to(device)
    worst = 0.0
    rows = []
    for name, opts in (("coop", {}), ("coop", {"class_token_position": "middle"}), ("cocoop", {})):
        method = build_method(bb, name, names, **opts).to(device).eval()
        logits = {}
        for m, chunk in (("textbook", 0), ("engine", 0), ("engine", 5), ("engine", "auto")):
            with mode(m, chunk), torch.no_grad():
                method.set_classes(ClassSet(names))
                logits[(m, chunk)] = forward(method, make_batch(method, images, None)).logits
        ref = logits[("textbook", 0)]
        for (m, chunk), value in logits.items():
            diff = (value - ref).abs().max().item()
            worst = max(worst, diff)
            rows.append({"method": name, "options": opts, "mode": m, "chunk": chunk, "max_abs_diff": diff})
    print(f"logits on a fixed batch (6 images, 23 classes), engine vs textbook: max |diff| = {worst:.2e}")
    out["equal_logits"] = {"rows": rows, "max_abs_diff": worst}

    accuracies = {}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = small_dataset(Path(tmp) / "data") if args.smoke else {"name": "embedded_objects_closeup"}
        for m, chunk in (("textbook", 0), ("engine", 0), ("engine", 3)):
            spec = validate_spec({
                "backbone": TINY, "method": [{"name": "coop"}, {"name": "cocoop"}],
                "dataset": dataset,
                "protocol": {"name": "base2novel", "shots": 4 if args.smoke else 16},
                "train": {"epochs": 1 if args.smoke else 4, "batch_size": 16, "crop_scale": [0.8, 1.0],
                          "seeds": [1], "text_chunk": chunk},
                "output": f"{tmp}/{m}-{chunk}",
            }, get_registry())
            with mode(m, chunk):
                record = Engine(spec, get_registry()).run()
            accuracies[f"{m} (text_chunk {chunk})"] = {r["method"]: r["accuracy"] for r in record["runs"]}
    ref = accuracies["textbook (text_chunk 0)"]
    gap = max(abs(v - ref[meth][split]) for acc in accuracies.values() for meth, d in acc.items()
              for split, v in d.items())
    for key, acc in accuracies.items():
        print(f"  {key:24s} " + "  ".join(f"{meth} {d['base']:.2f}/{d['novel']:.2f}" for meth, d in acc.items()))
    print(f"accuracies after training (base/novel), largest difference from textbook: {gap:.2f} points")
    out["equal_accuracy"] = {"accuracies": accuracies, "max_difference_points": gap}
    if worst > 1e-3 or gap > 0.1:
        raise SystemExit("engine and textbook mode disagree")


def section_steps(args, device, out: dict) -> None:
    """CoOp: training step and evaluation of a test split, time and peak memory."""
    shapes = [("tiny", TINY, [10, 100] if args.smoke else [100, 500, 1000])]
    if not args.smoke:
        shapes.append(("ViT-B/16-sized", VIT_B16, args.classes))
    results = []
    for label, section, counts in shapes:
        bb = build_backbone(section, device)
        for n_classes in counts:
            names = class_names(n_classes)
            g = torch.Generator().manual_seed(0)
            images = torch.rand(args.batch, 3, bb.image_size, bb.image_size, generator=g).to(device)
            targets = torch.randint(0, n_classes, (args.batch,), generator=g).to(device)
            row = {"model": label, "classes": n_classes}
            with tempfile.TemporaryDirectory() as tmp:
                shown = names[: args.eval_images]  # a prefix of the classes: labels stay their indices
                eval_items = write_images(Path(tmp) / "test", shown, -(-args.eval_images // len(shown)))
                eval_items = eval_items[: args.eval_images]
                eval_set = EvalSet("test", eval_items, ClassSet(names))
                for m in MODES:
                    if m == "textbook" and label != "tiny" and n_classes > args.textbook_max_classes:
                        row[m] = {"skipped": f"over --textbook-max-classes {args.textbook_max_classes}"}
                        continue
                    with mode(m):
                        method = build_method(bb, "coop", names).to(device)
                        method.set_classes(ClassSet(names))
                        opt = make_optimizer(optimizer_groups(method), TrainSpec(lr=0.002))
                        warm = 0 if (m == "textbook" and label != "tiny") else 1
                        for _ in range(warm):
                            train_step(method, images, targets, opt)
                        sync(device)
                        with PeakMemory(device) as mem:
                            t0 = time.perf_counter()
                            for _ in range(args.steps):
                                train_step(method, images, targets, opt)
                            sync(device)
                            step = (time.perf_counter() - t0) / args.steps
                        engine = make_engine(section, Path(tmp) / "out", eval_batch_size=args.batch)
                        t0 = time.perf_counter()
                        engine.evaluate("coop", method, eval_set, engine.spec.train)
                        sync(device)
                        evaluation = time.perf_counter() - t0
                    row[m] = {"train_step_s": step, "train_peak_mb": mem.peak_mb, "eval_s": evaluation}
                    print(f"  {label:15s} {n_classes:5d} classes  {m:8s}  step {step:8.3f} s  peak "
                          f"{mem.peak_mb:8.0f} MB   eval of {len(eval_items)} images {evaluation:8.3f} s", flush=True)
            if "train_step_s" in row.get("textbook", {}):
                row["step_ratio"] = row["textbook"]["train_step_s"] / row["engine"]["train_step_s"]
                row["eval_ratio"] = row["textbook"]["eval_s"] / row["engine"]["eval_s"]
                print(f"  {label:15s} {n_classes:5d} classes  textbook/engine: step {row['step_ratio']:.2f}x, "
                      f"eval {row['eval_ratio']:.2f}x", flush=True)
            results.append(row)
    out["steps"] = results


def section_cache(args, device, out: dict) -> None:
    """A test split scored twice with the disk cache (each time a fresh engine)."""
    section = TINY if args.smoke else VIT_B16
    bb = build_backbone(section, device)
    names = class_names(10)
    with tempfile.TemporaryDirectory() as tmp:
        items = write_images(Path(tmp) / "test", names, max(1, args.cache_images // len(names)))
        eval_set = EvalSet("test", items, ClassSet(names))
        method = build_method(bb, "coop", names).to(device)
        times = []
        for _ in range(2):
            engine = make_engine(section, Path(tmp) / "out", feature_cache=str(Path(tmp) / "cache"))
            t0 = time.perf_counter()
            acc = engine.evaluate("coop", method, eval_set, engine.spec.train)
            times.append(time.perf_counter() - t0)
        stored = sum(f.stat().st_size for f in (Path(tmp) / "cache").iterdir())
    ratio = times[0] / times[1]
    print(f"feature cache, {len(items)} test images ({section['model']}): first {times[0]:.2f} s, "
          f"second (read from disk, fresh engine) {times[1]:.3f} s: {ratio:.1f}x; {stored / 2**20:.1f} MB on disk; "
          f"accuracy {acc:.2f}")
    out["cache"] = {"images": len(items), "first_s": times[0], "second_s": times[1], "ratio": ratio}


def _run(spec: dict, tmp: str, tag: str, textbook_on: bool = False) -> tuple[dict, float]:
    spec = validate_spec({**spec, "output": f"{tmp}/{tag}"}, get_registry())
    t0 = time.perf_counter()
    with textbook(textbook_on):
        record = Engine(spec, get_registry()).run()
    return record, time.perf_counter() - t0


def section_views(args, device, out: dict) -> None:
    """augment_views against exact training: on the embedded base-to-novel task (the
    tiny CLIP, 32-px images; ``--smoke``: the small synthetic dataset), and, unless
    ``--smoke``, on a synthetic 50-class task with the ViT-B/16-sized model, where the
    frozen image pass is most of an exact step."""
    epochs = 2 if args.smoke else 10
    with tempfile.TemporaryDirectory() as data:
        tiny = {
            "backbone": TINY, "method": [{"name": "coop"}, {"name": "cocoop"}],
            "dataset": small_dataset(Path(data)) if args.smoke else {"name": "embedded_objects_closeup"},
            "protocol": {"name": "base2novel", "shots": 4 if args.smoke else 16},
            "train": {"epochs": epochs, "batch_size": 32, "crop_scale": [0.8, 1.0],
                      "seeds": [1] if args.smoke else [1, 2, 3]},
        }
        title = "synthetic 8 classes, tiny CLIP" if args.smoke else "embedded world, tiny CLIP"
        out["views"] = _views(args, tiny, epochs, title)
    if not args.smoke:
        with tempfile.TemporaryDirectory() as data:
            names = class_names(50)
            for split, per_class in (("train", 4), ("val", 1), ("test", 1)):
                write_images(Path(data) / split, names, per_class, seed=len(split))
            large = {
                "backbone": VIT_B16, "method": [{"name": "coop"}],
                "dataset": {"name": "folder", "path": data}, "protocol": {"name": "base2novel", "shots": 4},
                "train": {"epochs": 3, "batch_size": 32, "seeds": [1]},
            }
            out["views_vit_b16"] = _views(args, large, 3, "synthetic 50 classes, ViT-B/16-sized", views=[4])


def _views(args, base: dict, epochs: int, title: str, views: list[int] | None = None) -> dict:
    print(f"  {title}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in [0] + (views or args.views):
            spec = json.loads(json.dumps(base))
            spec["train"]["augment_views"] = k
            record, wall = _run(spec, tmp, f"views{k}")
            per_epoch = {}  # epochs only: building the views is not in them
            for r in record["runs"]:
                per_epoch.setdefault(r["method"], []).extend(e["time_s"] for e in r["epochs"])
            rows[k] = {"summary": record["summary"], "wall_s": wall,
                       "epoch_s": {meth: sum(v) / len(v) for meth, v in per_epoch.items()}}
    exact = rows[0]
    for k, row in rows.items():
        for meth, s in row["summary"].items():
            line = f"    K={k:3d} {meth:8s} H {s['H']['mean']:6.2f}  epoch {row['epoch_s'][meth]:7.3f} s"
            if k:
                line += (f"  ({exact['epoch_s'][meth] / row['epoch_s'][meth]:.1f}x faster than exact;  "
                         f"H {s['H']['mean'] - exact['summary'][meth]['H']['mean']:+.2f})")
            elif meth == next(iter(row["summary"])):
                line += f"  (run {row['wall_s']:.1f} s)"
            print(line)
    return {str(k): v for k, v in rows.items()}


def section_cocoop(args, device, out: dict) -> None:
    """A CoCoOp training step at batch 32, 10 classes: batched against the per-image loop."""
    section = TINY if args.smoke else VIT_B16
    bb = build_backbone(section, device)
    names = class_names(10)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, bb.image_size, bb.image_size, generator=g).to(device)
    targets = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    row = {}
    for m in MODES:
        with mode(m):
            method = build_method(bb, "cocoop", names).to(device)
            opt = make_optimizer(optimizer_groups(method), TrainSpec(lr=0.002))
            train_step(method, images[:2], targets[:2], opt)  # warm-up
            sync(device)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                train_step(method, images, targets, opt)
                sync(device)
            row[m] = {"train_step_s": time.perf_counter() - t0, "peak_mb": mem.peak_mb}
    row["ratio"] = row["textbook"]["train_step_s"] / row["engine"]["train_step_s"]
    print(f"CoCoOp step at batch {args.batch}, 10 classes ({section['model']}): per-image loop "
          f"{row['textbook']['train_step_s']:.2f} s, engine {row['engine']['train_step_s']:.2f} s: {row['ratio']:.1f}x")
    out["cocoop"] = row


def section_run(args, device, out: dict) -> None:
    """A whole base-to-novel run (3 seeds unless ``--run-seeds``), every method at its
    recipe's batch size: wall time in textbook mode and in the engine. ``--run-model`` and
    ``--run-methods`` (``all`` or a comma-separated list) choose what runs. The textbook
    pairs of the methods in ``--run-estimate`` are not run but estimated
    (:func:`_estimate_pair`): the engine still runs them whole, and its measured training
    time checks the estimate."""
    section = TINY if args.smoke or args.run_model == "tiny" else VIT_B16
    n_classes = 10 if args.smoke else args.run_classes
    run_methods = args.run_methods
    estimated = [m for m in args.run_estimate.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        names = class_names(n_classes)
        for split, per_class in (("train", 2), ("val", 1), ("test", args.run_test_per_class)):
            write_images(Path(tmp) / "data" / split, names, per_class, seed=len(split))
        spec = {
            "backbone": section, "method": "all",
            "dataset": {"name": "folder", "path": f"{tmp}/data"},
            "protocol": {"name": "base2novel", "shots": 1},
            "train": {"epochs": 1, "seeds": list(range(1, args.run_seeds + 1))},
        }
        resolved = Engine(validate_spec({**spec, "output": f"{tmp}/resolve"}, get_registry()), get_registry()).methods
        every = [m.name for m in resolved] if run_methods == "all" else run_methods.split(",")
        unknown = sorted(set(every + estimated) - {m.name for m in resolved})
        if unknown:
            raise SystemExit(f"--run-methods/--run-estimate: unknown method(s) {', '.join(unknown)}")
        if not set(estimated) <= set(every) or set(every) <= set(estimated):
            raise SystemExit("--run-estimate: name methods that --run-methods runs; leave one to run whole")
        walls, per_pair = {}, {}
        for m in MODES:
            run = [name for name in every if m == "engine" or name not in estimated]
            record, walls[m] = _run({**spec, "method": [{"name": name} for name in run]}, tmp, m,
                                    textbook_on=m == "textbook")
            per_pair[m] = {f"{r['method']} seed {r['seed']}": r["cost"]["time_s"] for r in record["runs"]}
            print(f"  {','.join(run)}, {n_classes} classes, {args.run_seeds} seeds, {m:8s}: {walls[m]:8.1f} s",
                  flush=True)
        estimates = {}
        if estimated:
            backbone = build_backbone(section, device)
            for method in (m for m in resolved if m.name in estimated):
                estimates[method.name] = row = {
                    mode_: _estimate_pair(backbone, method, names, args.run_test_per_class, device, mode_,
                                          args.run_estimate_steps)
                    for mode_ in MODES
                }
                measured = [t["train"] for key, t in per_pair["engine"].items() if key.startswith(f"{method.name} ")]
                row["engine_measured_train_s"] = sum(measured) / len(measured)
                row["textbook_total_s"] = args.run_seeds * row["textbook"]["pair_s"]
                print(f"  {method.name} textbook, estimated: {row['textbook']['step_s']:.2f} s a step x "
                      f"{row['textbook']['steps']} steps + eval {row['textbook']['eval_s']:.1f} s = "
                      f"{row['textbook']['pair_s']:.1f} s a seed, {row['textbook_total_s']:.1f} s for "
                      f"{args.run_seeds} seeds; the same estimate of the engine's training "
                      f"{row['engine']['train_s']:.1f} s a seed against "
                      f"{row['engine_measured_train_s']:.1f} s measured", flush=True)
    textbook_total = walls["textbook"] + sum(r["textbook_total_s"] for r in estimates.values())
    ratio = textbook_total / walls["engine"]
    label = f"textbook {textbook_total:.1f} s" + (f" ({', '.join(estimates)} estimated)" if estimates else "")
    print(f"whole run ({section['model']}, {run_methods}): {label}, engine {walls['engine']:.1f} s: "
          f"{ratio:.2f}x (textbook/engine)")
    out["run"] = {"model": section["model"], "methods": run_methods, "classes": n_classes, "wall_s": walls,
                  "textbook_total_s": textbook_total, "ratio": ratio, "pairs": per_pair, "estimated": estimates}


def _estimate_pair(backbone, method, names: list[str], test_per_class: int, device, mode_name: str,
                   k: int) -> dict:
    """The time of one (method, seed) pair of :func:`section_run` in ``mode_name``, for a
    textbook pair too long to run: ``k`` training steps timed at the recipe's batch size
    (the first one included, as a real pair pays it) times the pair's step count, plus
    its evaluation of the base and the novel test split run as that mode runs it (test
    images encoded by the method in textbook mode; text features per test batch)."""
    settings = method.train
    n_base = math.ceil(len(names) / 2)
    n_train = n_base  # 1 shot
    batch = settings.batch_size
    steps = settings.epochs * (n_train // batch if n_train >= batch else 1)
    g = torch.Generator().manual_seed(0)
    size = backbone.image_size
    with mode(mode_name):
        entry = get_registry().get("method", method.name)
        torch.manual_seed(0)
        model = entry.build(backbone, ClassSet(names[:n_base]), method.options).to(device)
        model.set_classes(ClassSet(names[:n_base]))
        optimizer = make_optimizer(optimizer_groups(model), settings)
        times = []
        for _ in range(k):
            images = torch.rand(batch, 3, size, size, generator=g).to(device)
            labels = torch.randint(0, n_base, (batch,), generator=g).to(device)
            t0 = time.perf_counter()
            train_step(model, images, labels, optimizer)
            sync(device)
            times.append(time.perf_counter() - t0)
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            for split in (names[:n_base], names[n_base:]):
                model.set_classes(ClassSet(split))
                n = len(split) * test_per_class
                for i in range(0, n, settings.eval_batch_size):
                    m = min(settings.eval_batch_size, n - i)
                    images = torch.rand(m, 3, size, size, generator=g).to(device)
                    labels = torch.randint(0, len(split), (m,), generator=g).to(device)
                    model.predict(forward(model, make_batch(model, images, labels))).argmax(-1)
            sync(device)
        eval_s = time.perf_counter() - t0
    step_s = sum(times) / len(times)
    return {"steps": steps, "batch_size": batch, "step_s": step_s, "steps_timed": k, "train_s": steps * step_s,
            "eval_s": eval_s, "pair_s": steps * step_s + eval_s}


SECTIONS = {"equal": section_equal, "steps": section_steps, "cache": section_cache, "views": section_views,
            "cocoop": section_cocoop, "run": section_run}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes only (CI)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--classes", default="100,500,1000", help="class counts for the ViT-B/16-sized steps")
    p.add_argument("--textbook-max-classes", type=int, default=500,
                   help="textbook mode needs more than 24 GB at 1000 classes on a ViT-B/16: skipped above this")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="timed training steps (engine; after one warm-up)")
    p.add_argument("--eval-images", type=int, default=128)
    p.add_argument("--cache-images", type=int, default=200)
    p.add_argument("--views", default="4,16", help="augment_views K values")
    p.add_argument("--run-classes", type=int, default=100)
    p.add_argument("--run-model", choices=["tiny", "vitb16"], default="vitb16")
    p.add_argument("--run-methods", default="zeroshot,coop,cocoop",
                   help="'all' or a comma-separated list of methods (textbook BPL at ViT-B/16 size takes hours "
                        "on a CPU: see --run-estimate)")
    p.add_argument("--run-estimate", default="",
                   help="methods whose textbook pairs are estimated from timed steps instead of run whole "
                        "(e.g. bpl: its textbook step takes over a minute at ViT-B/16 size on a CPU)")
    p.add_argument("--run-estimate-steps", type=int, default=3, help="training steps timed per estimate")
    p.add_argument("--run-seeds", type=int, default=3, help="seeds of the whole run")
    p.add_argument("--run-test-per-class", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    args.classes = [int(c) for c in args.classes.split(",")]
    args.views = [int(k) for k in args.views.split(",")]
    if args.smoke:
        args.steps, args.eval_images, args.cache_images, args.views, args.batch = 1, 16, 40, [2], 8
        # the run: a method run whole in both modes, and one estimated in textbook mode
        args.run_methods, args.run_seeds = "coop,bpl", 2
        args.run_estimate, args.run_estimate_steps = "bpl", 1
    device = torch.device(args.device)
    set_seed(0)
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    out: dict = {"device": str(device), "smoke": args.smoke}
    for name in args.sections.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"--sections: unknown section {name!r} (of {', '.join(SECTIONS)})")
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        SECTIONS[name](args, device, out)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
