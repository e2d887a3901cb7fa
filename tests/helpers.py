"""Small worlds for tests: a tiny random open_clip config and a split-file dataset."""

from __future__ import annotations

import json
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
    path = folder / f"{name}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def write_split_dataset(root: Path, name: str = "toy", per_class=(6, 2, 3), seed: int = 0) -> Path:
    """``root/<name>/images/*.png`` + ``split.json`` (split-file layout) and a spec
    file ``root/specs/<name>.yaml``; returns the specs folder."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    classnames = list(COLOURS)
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
