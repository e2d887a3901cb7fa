"""MaPLe: peak memory and time of one training step at the recipe's batch (4), on a
randomly initialised ViT-B/16-sized open_clip model, through the engine's text pass
(the shared prefix once, chunks of about 1 GiB of activations recomputed in the
backward pass) against the reference's (every prompt padded to 77 tokens, all of them
in one pass: textbook mode).

Each measurement runs in its own process, so its peak (max RSS on CPU, weights and
the prompted image pass included; peak allocated on CUDA) is its own. The baseline runs
at fewer classes: at 1000 it needs more than this machine's memory (MaPLe's users
report 20-24 GB on a GPU in fp16).

    python benchmarks/maple_memory.py                          # ViT-B-16: 100 classes both ways, 1000 the engine's
    python benchmarks/maple_memory.py --model vlprompt_tiny --classes 200 --baseline-classes 50   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ADJECTIVES = ["red", "small", "wooden", "striped", "golden", "wild", "old", "spotted", "giant", "northern"]
NOUNS = ["fox", "teapot", "sports car", "mountain bike", "grand piano", "owl", "lighthouse", "tree frog",
         "umbrella", "espresso machine"]
PLACES = ["alpine", "coastal", "desert", "urban", "arctic", "tropical", "indoor", "garden", "forest", "mountain"]


def class_names(n: int) -> list[str]:
    """``n`` distinct names of 2 to 4 words, like ImageNet's (up to 1100)."""
    names = [f"{a} {b}" for b in NOUNS for a in ADJECTIVES]
    names += [f"{c} {name}" for c in PLACES for name in names]
    return names[:n]


def worker(args) -> dict:
    import torch

    from vlprompt_core import textbook
    from vlprompt_core.api import Batch, ClassSet
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip
    from vlprompt_core.engine import make_optimizer, optimizer_groups
    from vlprompt_core.prompting import text_chunking
    from vlprompt_core.spec import TrainSpec
    from vlprompt_plugin_maple import MAPLE_RECIPE, MaPLe, MaPLeOptions

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    pretrained = "embedded" if args.model == "vlprompt_tiny" else None
    bb = build_open_clip(OpenClipOptions(model=args.model, pretrained=pretrained)).to(device)
    with textbook.textbook(args.mode == "textbook"), text_chunking(0 if args.mode == "textbook" else "auto"):
        # textbook mode lays the prompts out as the reference does (padded to 77): build inside it
        method = MaPLe(bb, ClassSet(class_names(args.classes)), MaPLeOptions(**MAPLE_RECIPE.options)).to(device)
        method.train()
        batch_size, lr = MAPLE_RECIPE.train["batch_size"], MAPLE_RECIPE.train["lr"]
        train = TrainSpec(lr=lr, weight_decay=MAPLE_RECIPE.train["weight_decay"])
        opt = make_optimizer(optimizer_groups(method), train)
        g = torch.Generator().manual_seed(1)
        images = torch.randn(batch_size, 3, bb.image_size, bb.image_size, generator=g).to(device)
        labels = torch.randint(0, args.classes, (batch_size,), generator=g).to(device)
        batch = Batch(images=images, labels=labels)
        t0 = time.perf_counter()
        loss = method.loss(method(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    return {"mode": args.mode, "classes": args.classes, "seconds": seconds, "peak_mb": peak / 2**20,
            "loss": float(loss), "trainable": trainable}


def measure(args, mode: str, classes: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--classes", str(classes),
           "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--classes", type=int, default=1000, help="classes of the engine's large step")
    p.add_argument("--baseline-classes", type=int, default=100, help="classes of the step run both ways")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--worker", choices=["engine", "textbook"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return
    rows = [measure(args, "textbook", args.baseline_classes), measure(args, "engine", args.baseline_classes),
            measure(args, "engine", args.classes)]
    weights = "the shipped weights" if args.model == "vlprompt_tiny" else "random weights"
    print(f"MaPLe training step (recipe: batch 4, n_ctx 2, depth 9), {args.model} ({weights}), device {args.device}, "
          f"{rows[0]['trainable']:,} trainable parameters")
    for r in rows:
        print(f"  {r['mode']:8s} {r['classes']:5d} classes   step {r['seconds']:8.2f} s   peak {r['peak_mb']:8.0f} MB"
              f"   loss {r['loss']:.4f}")
    base, same = rows[0], rows[1]
    print(f"  at {base['classes']} classes: engine peak {base['peak_mb'] / same['peak_mb']:.1f}x lower, "
          f"step {base['seconds'] / same['seconds']:.1f}x faster; loss difference {abs(base['loss'] - same['loss']):.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
