"""Per-process peak memory of a 1000-class CoOp training step in 1 and 2 processes
(torch.distributed, gloo on the CPU, NCCL on GPUs), on a randomly initialised
ViT-B/16-sized open_clip model (its config ships with open_clip: nothing is downloaded).

One global batch of 32 images, split over the processes as a distributed run splits it
(:mod:`vlprompt_core.engine.distributed`): each process encodes its share of the images,
and the text pass is either run whole in every process (plain data parallel, a method
that does not set ``shards_classes``) or sharded over classes (each process encodes its
share of the classes; the features gathered with their gradient). Then the weighted
backward pass, the gradients summed, one SGD step, as the engine's training loop does it.
Each configuration runs in fresh processes; a process's peak is its resident memory
(VmHWM, reset just before the step: weights included) on the CPU, its peak allocated
memory on CUDA. The context after the step is compared with the one-process step's.

    python benchmarks/distributed_memory.py                      # ViT-B-16, 1000 classes, text_chunk 0 and auto
    python benchmarks/distributed_memory.py --model vlprompt_tiny --classes 100 --chunks 0   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from maple_memory import class_names  # noqa: E402  (ImageNet-like names of 2 to 4 words)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(rank: int, processes: int, port: int, config: dict, folder: str) -> None:
    """One process of one configuration: build, then one training step; its figures go
    to ``folder/<rank>.json`` (and the context after the step to ``folder/ctx.pt``)."""
    import torch

    torch.set_num_threads(config["threads"])
    cuda = config["device"] == "cuda"
    if processes > 1:
        import torch.distributed as dist

        if cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=processes)
    from vlprompt_core.api import Batch, ClassSet
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip
    from vlprompt_core.data.loader import contiguous_part
    from vlprompt_core.engine import make_optimizer, optimizer_groups
    from vlprompt_core.engine.distributed import Distributed, Strategy
    from vlprompt_core.prompting import text_chunking
    from vlprompt_core.spec import TrainSpec
    from vlprompt_plugin_coop import RECIPE, CoOp, CoOpOptions

    class Method(CoOp):
        shards_classes = config["sharded"]

    strategy = Distributed() if processes > 1 else Strategy()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    pretrained = "embedded" if config["model"] == "vlprompt_tiny" else None
    bb = build_open_clip(OpenClipOptions(model=config["model"], pretrained=pretrained)).to(device).eval()
    bb.requires_grad_(False)
    method = Method(bb, ClassSet(class_names(config["classes"])), CoOpOptions(n_ctx=16)).to(device).train()
    opt = make_optimizer(optimizer_groups(method), TrainSpec(**{k: RECIPE.train[k] for k in ("lr", "weight_decay")}))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(config["batch"], 3, bb.image_size, bb.image_size, generator=g)
    labels = torch.randint(0, config["classes"], (config["batch"],), generator=g)
    mine = contiguous_part(config["batch"], strategy.rank, strategy.world_size)
    images, labels = images[mine].to(device), labels[mine].to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    strategy.sum([0.0])  # the group's connections made before the clock starts
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    t0 = time.perf_counter()
    with text_chunking(config["chunk"]):
        with torch.no_grad():
            batch = Batch(image_features=bb.encode_image(images), labels=labels)
        with strategy.sharding_classes(method):
            out = method(batch)
            loss = method.loss(out, batch)
        whole = strategy.global_loss(loss, len(labels))
        opt.zero_grad(set_to_none=True)
        method.backward(strategy.local_loss(loss, len(labels), whole), out, batch)
        params = {n: p for n, p in method.named_parameters() if p.requires_grad}
        strategy.all_reduce_grads(params)
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = strategy.max(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _rss_mb("VmHWM")
    figures = {"rank": rank, "peak_mb": peak, "before_mb": before, "seconds": seconds, "loss": whole.mean,
               "text_rows": len(range(config["classes"])[strategy.part(config["classes"])]) if config["sharded"]
               else config["classes"]}
    Path(folder, f"{rank}.json").write_text(json.dumps(figures))
    if rank == 0:
        torch.save(method.ctx.detach().cpu(), Path(folder, "ctx.pt"))
    if processes > 1:
        strategy.dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(processes: int, config: dict) -> dict:
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(worker, args=(processes, free_port(), config, folder), nprocs=processes, join=True,
                           start_method="spawn")
        ranks = [json.loads(Path(folder, f"{r}.json").read_text()) for r in range(processes)]
        ctx = torch.load(Path(folder, "ctx.pt"))
    return {"processes": processes, **config, "ranks": ranks, "peak_mb": max(r["peak_mb"] for r in ranks),
            "before_mb": max(r["before_mb"] for r in ranks), "seconds": ranks[0]["seconds"], "ctx": ctx}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32, help="the global batch")
    p.add_argument("--chunks", default="0,auto", help="train.text_chunk values to measure (comma-separated)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    rows = []
    for chunk in [c if c == "auto" else int(c) for c in args.chunks.split(",")]:
        base = {"model": args.model, "classes": args.classes, "batch": args.batch, "chunk": chunk,
                "device": args.device, "threads": args.threads}
        one = measure(1, {**base, "sharded": False})
        rows.append(one)
        for sharded in (False, True):
            two = measure(2, {**base, "sharded": sharded})
            two["ctx_difference"] = (two["ctx"] - one["ctx"]).abs().max().item()
            rows.append(two)
    weights = "the shipped weights" if args.model == "vlprompt_tiny" else "random weights"
    print(f"CoOp training step (16 context vectors, global batch {args.batch}), {args.model} ({weights}), "
          f"{args.classes} classes, {args.device}, {args.threads} thread(s) per process")
    print("text_chunk  processes  text pass             peak/process  before step   step      ctx vs 1 process")
    for r in rows:
        how = "-" if r["processes"] == 1 else "sharded over classes" if r["sharded"] else "whole in each"
        diff = f"{r['ctx_difference']:.1e}" if "ctx_difference" in r else "-"
        print(f"{str(r['chunk']):10s}  {r['processes']:9d}  {how:20s}  {r['peak_mb']:9.0f} MB  {r['before_mb']:8.0f} MB"
              f"  {r['seconds']:6.1f} s  {diff}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "ctx"} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
