"""Small worlds for tests: a tiny random open_clip config and split-file datasets.

Everything is generated (no downloads): :func:`write_tiny_config` writes an
open_clip model config (16 px images, width 32, 2 layers per tower) for
``backbone: {name: open_clip, model: <that file>, pretrained: null}``;
:func:`write_split_dataset` writes a 6-class dataset of coloured noise images in
the benchmarks' split-file layout plus its ``datasets_spec`` file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
    "yellow": (230, 220, 30), "purple": (150, 40, 170), "orange": (240, 140, 20),
}


def write_tiny_config(folder: Path, name: str = "tiny_test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def write_split_dataset(root: Path, name: str = "toy", per_class=(6, 2, 3), seed: int = 0,
                        n_classes: int = len(COLOURS)) -> Path:
    """``root/<name>/images/*.png`` + ``split.json`` (split-file layout) and a spec
    file ``root/specs/<name>.yaml`` for the first ``n_classes`` colours; returns the
    specs folder."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    classnames = list(COLOURS)[:n_classes]
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(classnames):
        for split_name, n in zip(("train", "val", "test"), per_class):
            for i in range(n):
                img = np.clip(np.array(COLOURS[cname]) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                rel = f"{cname}_{split_name}_{i}.png"
                Image.fromarray(img).save(folder / "images" / rel)
                split[split_name].append([rel, label, cname])
    (folder / "split.json").write_text(json.dumps(split))
    specs = root / "specs"
    specs.mkdir(exist_ok=True)
    (specs / f"{name}.yaml").write_text(
        "\n".join([
            f"name: {name}", "layout: split_file", f"folder: {name}", "image_dir: images",
            "split_file: split.json", "templates: ['a photo of a {}.']",
            "classnames: [" + ", ".join(classnames) + "]",
        ]) + "\n"
    )
    return specs


def tiny_backbone(folder: Path, seed: int = 0):
    """A frozen tiny open_clip backbone with random weights (deterministic in ``seed``)."""
    import torch

    from ..builtin.open_clip_backbone import OpenClipOptions, build_open_clip

    config = write_tiny_config(Path(folder))
    torch.manual_seed(seed)
    return build_open_clip(OpenClipOptions(model=str(config), pretrained=None))


def edited_backbone(backbone, changes: dict):
    """A copy of an open_clip ``backbone`` whose attention projection weights are ``W + D``
    for each ``{ProjectionSite: D}`` in ``changes``: the reference an adapter of the
    projections (``backbone.adapted``, e.g. LoRA merged into the weights) is compared with."""
    import copy

    import torch

    other = copy.deepcopy(backbone)
    towers = {"text": other.text.transformer, "image": other.visual.transformer}
    with torch.no_grad():
        for site, d in changes.items():
            attn = towers[site.tower].resblocks[site.layer].attn
            if site.projection == "out":
                attn.out_proj.weight += d
            else:
                i = "qkv".index(site.projection)
                attn.in_proj_weight[i * d.shape[0]:(i + 1) * d.shape[0]] += d
    return other


def make_world(root: Path) -> dict[str, Path]:
    """A tiny model config, a 6-class dataset ``toy``, a shifted copy ``toy_shift``
    and a 5-class ``toy5`` (base and novel halves of different sizes); their spec
    files are in ``specs``, for ``$VLPROMPT_DATASETS_SPEC``."""
    root = Path(root)
    config = write_tiny_config(root)
    specs = write_split_dataset(root / "data", "toy", seed=0)
    write_split_dataset(root / "data", "toy_shift", seed=1)
    write_split_dataset(root / "data", "toy5", seed=2, n_classes=5)
    return {"root": root, "config": config, "specs": specs, "data": root / "data"}


@contextlib.contextmanager
def registered_world(root: Path) -> Iterator[dict[str, Path]]:
    """:func:`make_world` in ``root``, its datasets registered (``$VLPROMPT_DATASETS_SPEC``)
    while the block runs: the contract batteries' world."""
    import pytest

    world = make_world(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
        yield world


def random_images(backbone, n: int, seed: int = 0):
    """``[n, 3, H, W]`` standard-normal images at the backbone's resolution, from ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=g)


def frozen_features(backbone, n: int, seed: int = 0):
    """The frozen image features of :func:`random_images` (no graph)."""
    import torch

    with torch.no_grad():
        return backbone.encode_image(random_images(backbone, n, seed))
