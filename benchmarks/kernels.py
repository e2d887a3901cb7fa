"""Benchmark the two ops: Triton kernels vs eager PyTorch vs ``torch.compile``.

    python benchmarks/kernels.py            # full on a CUDA GPU, smoke mode elsewhere
    python benchmarks/kernels.py --smoke    # tiny shapes anywhere (CI; Triton in its interpreter on CPU)
    python benchmarks/kernels.py --full --dtype bf16 --json out.json

Full mode (CUDA only) runs the research shapes: 1000 classes, 77 tokens, width
512, batches 32-256, CoOp's shared context and CoCoOp's per-image context (the
``[B*C, L, D]`` prompts), shared and per-image text features. For each case it
prints the median time of eager PyTorch (the reference ops), ``torch.compile`` of
the same functions and the Triton backend, the speed-ups over eager measured in
the same run, and the Triton kernels' achieved memory bandwidth against the
device's peak. Bytes are the compulsory traffic of each pass (inputs read once,
outputs written once; the assembly backward needs only the gradient rows at the
context slots), so the figure is the effective bandwidth: what the op would
reach if it moved nothing else.
Cases that run out of memory print ``OOM`` (eager CoCoOp assembly holds three
``[B, C, L, D]`` tensors).

``--tail`` profiles the text tower's tail (end-token gather, final layer norm,
projection) against its transformer blocks: what a fused tail could save.

In smoke mode timings of the interpreter are not performance figures: the mode
exists to prove every path runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# torch.compile's worker processes would otherwise keep compiling in the background while
# the next case is timed (on a 2-core CI machine that doubles eager times); compile time is not measured
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels" / "src"))  # a checkout without install

from vlprompt_kernels import _dispatch, reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_GBS = {  # fallback when the device properties lack the memory clock: name fragment -> GB/s
    "H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600,
    "RTX 4090": 1008, "RTX 3090": 936, "V100": 900, "T4": 320,
}


@dataclass
class Row:
    op: str
    layout: str
    batch: int
    shape: str
    pass_: str  # "fwd" or "fwd+bwd"
    bytes: int
    ms: dict[str, float | str] = field(default_factory=dict)  # impl -> median ms, or "OOM"/"error"

    def speedup(self, impl: str) -> float | None:
        base, t = self.ms.get("eager"), self.ms.get(impl)
        return base / t if isinstance(base, float) and isinstance(t, float) and t > 0 else None

    def gbs(self, impl: str) -> float | None:
        t = self.ms.get(impl)
        return self.bytes / (t * 1e-3) / 1e9 if isinstance(t, float) and t > 0 else None


# ------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gbs(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-gbs"
    if device.type != "cuda":
        return None, "n/a on CPU"
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width (device properties)"
    for fragment, gbs in PEAK_GBS.items():
        if fragment in props.name:
            return float(gbs), f"datasheet ({fragment})"
    return None, "unknown (pass --peak-gbs)"


# ------------------------------------------------------------------- cases


def impls(names: list[str], device: torch.device) -> dict[str, dict]:
    """impl name -> {"assemble": fn, "cosine": fn}."""
    out: dict[str, dict] = {}
    if "eager" in names:
        out["eager"] = {"assemble": reference.assemble_prompts, "cosine": reference.cosine_logits}
    if "compile" in names:
        import logging

        torch._logging.set_logs(dynamo=logging.ERROR)  # the reference's int(slots.max()) graph break, every case
        out["compile"] = {
            "assemble": torch.compile(reference.assemble_prompts),
            "cosine": torch.compile(reference.cosine_logits),
        }
    if "triton" in names:
        module, _, error = _dispatch.triton_status()
        if module is None:
            print(f"# triton unavailable ({error}): no Triton column")
        elif device.type != "cuda" and not _dispatch.interpreting():
            print("# Triton on CPU tensors needs TRITON_INTERPRET=1 (set by default here): no Triton column")
        else:
            out["triton"] = {"assemble": module.assemble_prompts, "cosine": module.cosine_logits}
    return out


def run_case(row: Row, make, impl_fns: dict, device, reps: int, warmup: int, key: str) -> Row:
    """``make(fn) -> zero-arg callable`` running one pass with implementation ``fn``."""
    for name, fns in impl_fns.items():
        try:
            call = make(fns[key])
            row.ms[name] = median_ms(call, device, reps, warmup)
        except torch.cuda.OutOfMemoryError:
            row.ms[name] = "OOM"
        except Exception as exc:  # noqa: BLE001 -- keep measuring the others; say what failed
            row.ms[name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        finally:
            call = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return row


def assemble_rows(args, device, dtype, impl_fns) -> list[Row]:
    C, L, D = args.classes, args.length, args.width
    esize = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(C, L, D, generator=gen).to(device, dtype)
    positional = torch.randn(L, D, generator=gen).to(device, dtype)
    rows = []
    layouts = [("CoOp shared ctx", None, args.coop_ctx)]
    layouts += [("CoCoOp per-image ctx", b, args.cocoop_ctx) for b in args.batches]
    for layout, batch, m in layouts:
        slots = torch.full((C, L), -1, dtype=torch.long)
        slots[:, 1 : 1 + m] = torch.arange(m)
        slots = slots.to(device)
        lead = () if batch is None else (batch, 1)
        ctx = (0.02 * torch.randn(*lead, m, D, generator=gen)).to(device, dtype).requires_grad_(True)
        n_out = (batch or 1) * C * L * D
        shape = f"[{'' if batch is None else f'{batch}*'}{C},{L},{D}]"
        read_fwd = (C * L * D + ctx.numel() + L * D) * esize
        fwd_bytes = read_fwd + n_out * esize
        # + read the output gradient at the context slots only (the rest does not reach ctx), write dctx
        bwd_bytes = fwd_bytes + ((batch or 1) * C * m * D + ctx.numel()) * esize
        grad = torch.randn((*lead[:1], C, L, D) if batch else (C, L, D), generator=gen).to(device, dtype)

        def fwd(fn, inputs=(base, ctx, slots, positional)):
            def call():
                with torch.no_grad():
                    fn(*inputs)
            return call

        def fwd_bwd(fn, inputs=(base, ctx, slots, positional), grad=grad):
            def call():
                torch.autograd.grad(fn(*inputs), inputs[1], grad)
            return call

        for pass_, make, nbytes in (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd, bwd_bytes)):
            row = Row("assemble_prompts", layout, batch or 0, shape, pass_, nbytes)
            rows.append(run_case(row, make, impl_fns, device, args.reps, args.warmup, "assemble"))
    return rows


def cosine_rows(args, device, dtype, impl_fns) -> list[Row]:
    C, D = args.classes, args.embed
    esize = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device="cpu").manual_seed(1)
    rows = []
    for per_image in (False, True):
        for b in args.batches:
            img = torch.randn(b, D, generator=gen).to(device, dtype)
            txt = torch.randn(*((b,) if per_image else ()), C, D, generator=gen).to(device, dtype)
            txt.requires_grad_(True)  # as in training: text features depend on the prompts; images are frozen
            grad = torch.randn(b, C, generator=gen).to(device, dtype)
            io = (img.numel() + txt.numel() + b * C) * esize
            fwd_bytes = io
            bwd_bytes = io + (b * C + img.numel() + 2 * txt.numel()) * esize  # read grad, image, text; write dtext
            layout = "per-image text" if per_image else "shared text"
            shape = f"[{b},{D}]x[{f'{b},' if per_image else ''}{C},{D}]"

            def fwd(fn, img=img, txt=txt):
                def call():
                    with torch.no_grad():
                        fn(img, txt, 100.0)
                return call

            def fwd_bwd(fn, img=img, txt=txt, grad=grad):
                def call():
                    torch.autograd.grad(fn(img, txt, 100.0), txt, grad)
                return call

            for pass_, make, nbytes in (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd, bwd_bytes)):
                row = Row("cosine_logits", layout, b, shape, pass_, nbytes)
                rows.append(run_case(row, make, impl_fns, device, args.reps, args.warmup, "cosine"))
    return rows


# -------------------------------------------------------------- text tail


def tail_profile(args, device, dtype) -> list[dict]:
    """Time one pre-LN residual block of a CLIP text tower against the tail ops.

    N prompts of L tokens and width W: a block (LN, causal self-attention, LN,
    4W GELU MLP) vs. the tail as the backbone runs it (final LN over all tokens,
    gather the end token, project) vs. the tail reordered (gather, then LN over N
    rows only: exact, the LN is per token) vs. the cosine logits. Forward and
    backward (gradients flow to the prompt embeddings in prompt learning).
    """
    N, L, W, E = args.tail_prompts, args.tail_length, args.tail_width, args.tail_width
    layers = args.tail_layers
    torch.manual_seed(0)
    heads = max(W // 64, 1)
    block = torch.nn.ModuleDict({
        "ln_1": torch.nn.LayerNorm(W), "attn": torch.nn.MultiheadAttention(W, heads, batch_first=True),
        "ln_2": torch.nn.LayerNorm(W), "fc": torch.nn.Linear(W, 4 * W), "proj": torch.nn.Linear(4 * W, W),
    }).to(device, dtype).requires_grad_(False)
    ln_final = torch.nn.LayerNorm(W).to(device, dtype).requires_grad_(False)
    projection = (torch.randn(W, E) / math.sqrt(W)).to(device, dtype)
    mask = torch.full((L, L), float("-inf"), device=device, dtype=dtype).triu(1)
    x0 = torch.randn(N, L, W, device=device, dtype=dtype)
    eot = torch.randint(L // 2, L, (N,), device=device)
    rows = torch.arange(N, device=device)
    image = torch.randn(max(args.batches), E, device=device, dtype=dtype)

    def run_block(x):
        h = block["ln_1"](x)
        x = x + block["attn"](h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + block["proj"](torch.nn.functional.gelu(block["fc"](block["ln_2"](x))))

    def tail_as_is(x):
        return ln_final(x)[rows, eot] @ projection

    def tail_gather_first(x):
        return ln_final(x[rows, eot]) @ projection

    text = torch.randn(N, E, device=device, dtype=dtype)
    parts = {
        "transformer block (x1)": run_block,
        "tail: ln_final(all tokens), gather, project": tail_as_is,
        "tail: gather, ln_final(N rows), project": tail_gather_first,
        "cosine logits (shared text)": lambda x: reference.cosine_logits(image, text, 100.0),
    }
    out = []
    for name, fn in parts.items():
        for pass_ in ("fwd", "fwd+bwd"):
            x = x0.clone().requires_grad_(pass_ == "fwd+bwd")
            text.requires_grad_(pass_ == "fwd+bwd")
            wrt = [text] if name.startswith("cosine") else [x]

            def call(fn=fn, x=x, pass_=pass_, wrt=wrt):
                if pass_ == "fwd":
                    with torch.no_grad():
                        fn(x)
                else:
                    y = fn(x)
                    torch.autograd.grad(y, wrt, torch.ones_like(y))

            out.append({"part": name, "pass": pass_, "ms": median_ms(call, device, args.reps, args.warmup)})
    for pass_ in ("fwd", "fwd+bwd"):
        t = {r["part"]: r["ms"] for r in out if r["pass"] == pass_}
        tower = layers * t["transformer block (x1)"] + t["tail: ln_final(all tokens), gather, project"]
        out.append({
            "part": f"tail's share of a {layers}-layer tower + tail",
            "pass": pass_,
            "percent": 100 * t["tail: ln_final(all tokens), gather, project"] / tower,
            "percent_gather_first": 100 * t["tail: gather, ln_final(N rows), project"] / tower,
        })
    return out


# ------------------------------------------------------------------ output


def fmt_ms(v) -> str:
    return f"{v:9.3f}" if isinstance(v, float) else f"{str(v)[:9]:>9}"


def print_table(rows: list[Row], names: list[str], peak: float | None, interp: bool) -> None:
    header = f"{'op':<17} {'layout':<21} {'B':>4} {'pass':<8}" + "".join(f" {n + ' ms':>11}" for n in names)
    header += "".join(f" {n + '/eager':>14}" for n in names if n != "eager")
    header += f" {'triton GB/s':>11} {'% peak':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        line = f"{r.op:<17} {r.layout:<21} {r.batch or '-':>4} {r.pass_:<8}"
        line += "".join(f"  {fmt_ms(r.ms.get(n, '-'))}" for n in names)
        for n in names:
            if n != "eager":
                s = r.speedup(n)
                line += f" {f'{s:.3g}x' if s else '-':>14}"
        g = r.gbs("triton") if not interp else None  # interpreter bandwidth means nothing
        line += f" {f'{g:.1f}' if g else '-':>11}"
        line += f" {f'{100 * g / peak:.1f}' if g and peak else '-':>7}"
        print(line)
    print("(speed-ups: eager time / that column's time, same run; "
          + ("Triton ran in its CPU interpreter: not a performance figure)" if interp else "higher is better)"))
    errors = {f"{r.op}/{r.layout}/{r.batch}/{r.pass_}/{n}": v for r in rows for n, v in r.ms.items()
              if isinstance(v, str) and v.startswith("error")}
    for k, v in errors.items():
        print(f"  {k}: {v}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, few repetitions (default without CUDA)")
    mode.add_argument("--full", action="store_true", help="research shapes (default with CUDA; needs CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="feature dtype (fp32: what the methods pass today)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 32,64,128,256")
    p.add_argument("--classes", type=int)
    p.add_argument("--length", type=int, help="tokens per prompt")
    p.add_argument("--width", type=int, help="token embedding width D")
    p.add_argument("--embed", type=int, help="joint embedding width of the features (cosine logits)")
    p.add_argument("--impl", default="eager,compile,triton", help="comma list of eager, compile, triton")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its CPU compile takes ~20 s)")
    p.add_argument("--tail", action="store_true", help="also profile the text tower's tail vs its blocks")
    p.add_argument("--tail-prompts", type=int, help="prompts N in the tail profile (77 tokens, width 512)")
    p.add_argument("--reps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--peak-gbs", type=float, help="peak memory bandwidth in GB/s if not detected")
    p.add_argument("--json", type=Path, help="also write every number here")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.full and not cuda:
        p.error("--full needs a CUDA GPU (use --smoke here)")
    smoke = args.smoke or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    defaults = (
        {"batches": [2, 4], "classes": 20, "length": 16, "width": 64, "embed": 32, "reps": 5, "warmup": 2,
         "tail_prompts": 8, "coop_ctx": 4, "cocoop_ctx": 4}
        if smoke else
        {"batches": [32, 64, 128, 256], "classes": 1000, "length": 77, "width": 512, "embed": 512, "reps": 20,
         "warmup": 3, "tail_prompts": 1000, "coop_ctx": 16, "cocoop_ctx": 4}
    )
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.tail_length, args.tail_width, args.tail_layers = 77, 512, 12  # CLIP ViT-B text tower
    names = [n.strip() for n in args.impl.split(",") if n.strip()]
    if args.no_compile and "compile" in names:
        names.remove("compile")
    dtype = DTYPES[args.dtype]

    _, version, error = _dispatch.triton_status()
    interp = _dispatch.interpreting()
    peak, peak_source = peak_gbs(device, args.peak_gbs)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# vlprompt-kernels benchmark, {'smoke' if smoke else 'full'} mode, {dtype}")
    print(f"# device: {dev_name}; torch {torch.__version__}; "
          f"triton {version or 'unavailable: ' + str(error)}{' (interpreter)' if interp else ''}")
    print(f"# peak memory bandwidth: {f'{peak:.0f} GB/s' if peak else '-'} ({peak_source})")
    print(f"# shapes: {args.classes} classes, {args.length} tokens, width {args.width}, embed {args.embed}, "
          f"batches {args.batches}; CoOp M={args.coop_ctx}, CoCoOp M={args.cocoop_ctx}")
    t0 = time.perf_counter()
    impl_fns = impls(names, device)
    names = [n for n in names if n in impl_fns]
    rows = assemble_rows(args, device, dtype, impl_fns) + cosine_rows(args, device, dtype, impl_fns)
    print()
    print_table(rows, names, peak, interp and "triton" in names)
    tail = tail_profile(args, device, dtype) if args.tail else []
    if tail:
        print(f"\n# text tower tail profile: {args.tail_prompts} prompts x {args.tail_length} tokens, "
              f"width {args.tail_width}, {args.tail_layers} layers")
        for r in tail:
            if "ms" in r:
                print(f"  {r['part']:<52} {r['pass']:<8} {r['ms']:9.3f} ms")
            else:
                print(f"  {r['part']:<52} {r['pass']:<8} {r['percent']:6.2f} % "
                      f"(gather first: {r['percent_gather_first']:.2f} %)")
    elapsed = time.perf_counter() - t0
    print(f"\n# done in {elapsed:.1f} s")
    if args.json:
        record = {
            "mode": "smoke" if smoke else "full", "device": dev_name, "dtype": args.dtype,
            "torch": torch.__version__, "triton": version, "triton_interpreter": interp, "impls": names,
            "peak_gbs": peak, "peak_source": peak_source,
            "shapes": {k: getattr(args, k) for k in ("batches", "classes", "length", "width", "embed")},
            "rows": [asdict(r) | {"speedup": {n: r.speedup(n) for n in names if n != "eager"},
                                  "triton_gbs": r.gbs("triton")} for r in rows],
            "tail": tail, "seconds": elapsed,
        }
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
