"""Pretrain the tiny embedded CLIP (``vlprompt_tiny``) on the procedural world.

Run ``python -m vlprompt_core.embedded.pretrain`` to regenerate the shipped
``vlprompt_tiny.safetensors`` and ``pretrain_log.json`` beside this file
(about 19 minutes on two idle CPU cores: 1,126 s for the shipped weights), or ``--out DIR`` to write elsewhere.

The model is a standard open_clip ``CLIP`` built from ``vlprompt_tiny.json``
and trained with open_clip's ``ClipLoss`` on freshly sampled image-caption
batches (every step draws new images from a seed derived from the run seed
and the step number, so a run is reproducible).  Weights are stored as
float16 to keep the file small; open_clip copies them into float32
parameters when loading.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from . import tasks, world

HERE = Path(__file__).resolve().parent
MODEL_NAME = "vlprompt_tiny"
CONFIG_PATH = HERE / f"{MODEL_NAME}.json"
WEIGHTS_NAME = f"{MODEL_NAME}.safetensors"
LOG_NAME = "pretrain_log.json"
ZERO_SHOT_TEMPLATE = "a photo of a {}."

# OpenAI CLIP normalisation, as in open_clip's default preprocess.
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def weights_path() -> Path:
    """The shipped checkpoint."""
    return HERE / WEIGHTS_NAME


def register_config() -> None:
    """Make ``open_clip.create_model("vlprompt_tiny")`` available."""
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


def to_tensor(images: np.ndarray):
    """uint8 NxHxWx3 images -> normalised float NCHW tensor.

    Equals open_clip's preprocess for images already at the model resolution.
    """
    import torch

    x = (images.astype(np.float32) / 255.0 - _MEAN) / _STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def zero_shot(model, tokenizer, task: str = "objects", split: str = "test",
              template: str = ZERO_SHOT_TEMPLATE, seed: int = 0) -> dict[str, float]:
    """Zero-shot accuracy on ``task``: over all classes, and base/novel halves.

    Base is the first ``ceil(n/2)`` labels and novel the rest; each half is
    scored with a classifier over that half's classes only.
    """
    import torch

    images, labels = tasks.generate(task, split, seed)
    names = tasks.classnames(task)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(to_tensor(images), normalize=True)
        txt = model.encode_text(tokenizer([template.format(c) for c in names]), normalize=True)
    sims = img @ txt.T
    labels = torch.from_numpy(labels)
    n_base = math.ceil(len(names) / 2)
    result = {"all": (sims.argmax(1) == labels).float().mean().item()}
    for half, lo, hi in (("base", 0, n_base), ("novel", n_base, len(names))):
        keep = (labels >= lo) & (labels < hi)
        pred = sims[keep][:, lo:hi].argmax(1) + lo
        result[half] = (pred == labels[keep]).float().mean().item()
    return {k: round(100 * v, 2) for k, v in result.items()}


def pretrain(out_dir: Path = HERE, steps: int = 1250, batch_size: int = 256, lr: float = 1e-3,
             weight_decay: float = 0.1, warmup: int = 100, seed: int = 0,
             log_every: int = 20, threads: int = 2) -> dict:
    """Train ``vlprompt_tiny`` from scratch; write weights and log to ``out_dir``.

    Returns the log (also written as ``pretrain_log.json``).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    start = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    register_config()
    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    loss_fn = open_clip.ClipLoss()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    history, running = [], []
    model.train()
    for step in range(steps):
        images, captions, _ = world.sample(batch_size, np.random.default_rng([seed, step]))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        image_features, text_features, logit_scale = model(to_tensor(images), tokenizer(captions))
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": round(float(np.mean(running)), 4),
                            "logit_scale": round(model.logit_scale.exp().item(), 2),
                            "elapsed_s": round(time.time() - start, 1)})
            running = []
            print(json.dumps(history[-1]), flush=True)

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_NAME
    save_file(state, str(weights))

    # Evaluate the weights exactly as shipped (float16 round trip).
    model = open_clip.create_model(MODEL_NAME, pretrained=str(weights))
    log = {
        "model": MODEL_NAME,
        "config": json.loads(CONFIG_PATH.read_text()),
        "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "warmup": warmup, "seed": seed, "threads": threads,
                     "weights_dtype": "float16"},
        "zero_shot": {"template": ZERO_SHOT_TEMPLATE, "task": "objects", "split": "test",
                      "chance_base": round(100 / math.ceil(len(tasks.classnames("objects")) / 2), 2),
                      "accuracy": zero_shot(model, tokenizer),
                      "accuracy_shifted": zero_shot(model, tokenizer, task="objects_shifted")},
        "wall_time_s": round(time.time() - start, 1),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "python": platform.python_version()},
        "history": history,
    }
    (out_dir / LOG_NAME).write_text(json.dumps(log, indent=1))
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: the package)")
    parser.add_argument("--steps", type=int, default=1250)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = pretrain(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(json.dumps({k: log[k] for k in ("zero_shot", "wall_time_s")}, indent=1))


if __name__ == "__main__":
    main()
