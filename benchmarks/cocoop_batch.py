"""CoCoOp: one training step at batch B against B batch-1 steps (the official
recipe's batch size), on a randomly initialised open_clip model.

Each mode runs in its own process so its peak memory (max RSS on CPU, peak
allocated on CUDA) is its own; both use the same model, classes and images.

    python benchmarks/cocoop_batch.py                       # ViT-B-16, 100 classes, B = 32
    python benchmarks/cocoop_batch.py --model vlprompt_tiny --classes 16   # quick
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


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    import torch

    from vlprompt_core.api import Batch, ClassSet
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip
    from vlprompt_core.engine import make_optimizer, optimizer_groups
    from vlprompt_core.prompting import text_chunking
    from vlprompt_core.spec import TrainSpec
    from vlprompt_plugin_cocoop import CoCoOp, CoCoOpOptions

    torch.manual_seed(0)
    device = torch.device(args.device)
    pretrained = "embedded" if args.model == "vlprompt_tiny" else None
    bb = build_open_clip(OpenClipOptions(model=args.model, pretrained=pretrained)).to(device)
    names = [f"object number {i}" for i in range(args.classes)]
    method = CoCoOp(bb, ClassSet(names), CoCoOpOptions()).to(device)
    method.train()
    opt = make_optimizer(optimizer_groups(method), TrainSpec(lr=0.002))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, bb.image_size, bb.image_size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)

    def step(x, y):
        with torch.no_grad():
            feats = bb.encode_image(x)
        batch = Batch(image_features=feats, labels=y)
        loss = method.loss(method(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with text_chunking("auto" if args.text_chunk == "auto" else int(args.text_chunk)):
        step(images[:1], labels[:1])  # warm-up
        sync()
        t0 = time.perf_counter()
        if args.mode == "batched":
            step(images, labels)
        else:
            for i in range(args.batch):
                step(images[i : i + 1], labels[i : i + 1])
        sync()
    return {"mode": args.mode, "seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(device),
            "prompts_per_pass": args.batch * args.classes if args.mode == "batched" else args.classes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--text-chunk", default="auto", help="prompts per text-tower pass, 0 (one pass) or auto")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--mode", choices=["batched", "loop"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    results = {}
    for mode in ("batched", "loop"):
        cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--classes", str(args.classes),
               "--batch", str(args.batch), "--text-chunk", str(args.text_chunk), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    b, loop = results["batched"], results["loop"]
    weights = "the shipped weights" if args.model == "vlprompt_tiny" else "random weights"
    print(f"CoCoOp training, {args.model} ({weights}), {args.classes} classes, device {args.device}")
    print(f"  one step at batch {args.batch}: {b['seconds']:8.2f} s   peak {b['peak_mb']:8.0f} MB")
    print(f"  {args.batch} steps at batch 1:  {loop['seconds']:8.2f} s   peak {loop['peak_mb']:8.0f} MB")
    print(f"  ratio (batch-1 loop / batched): {loop['seconds'] / b['seconds']:.2f}x")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
