"""Frozen image features: extracted once, shared by every method and seed of a run,
and optionally kept on disk between runs (``train.feature_cache``).

Two kinds of features go through :class:`FeatureStore`:

* an evaluation split's features under the test transform, for every method
  that reads only frozen features (and for those that want both);
* ``K`` augmented views of each training image (``train.augment_views``), for
  methods that read only frozen features.

Each is addressed by what it is computed from: the backbone's weights (a hash
of every tensor), the items (path, label, file size and modification time), the
transform (its full description), the precision, the device type and, for views,
K. So two methods or two seeds with the same items and transform share one
extraction, and a changed image file, backbone or transform misses the cache.

On disk a feature file is ``<key>.safetensors``; it is written to a temporary
file in the same folder, flushed to disk and renamed into place, so a run killed
mid-write leaves no partial file under the final name, and concurrent runs that
compute the same features replace it with the same content. A file that cannot
be read, or fails its integrity check (:func:`integrity`: the checksum of its
content written with it, one row per readable item, the items' own labels), is
computed again and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .api import Item
from .data import Unreadable, UnreadableImages
from .results import atomic_file

#: Bump when the layout or meaning of cached feature files changes.
FORMAT = 1


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    """Feed ``t``'s name, dtype, shape and bytes to the hash ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    state = module.state_dict(keep_vars=False)
    for name in sorted(state):
        if isinstance(state[name], torch.Tensor):
            _hash_tensor(h, name, state[name])
    return h.hexdigest()


def items_fingerprint(items: list[Item]) -> str:
    """sha256 of each item's path, label, file size and modification time."""
    h = hashlib.sha256()
    for it in items:
        try:
            st = os.stat(it.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{it.path}\t{it.label}\t{stamp}\n".encode())
    return h.hexdigest()


@dataclass
class Features:
    """Frozen features ``[N, D]`` (or ``[K, N, D]`` for views) with their labels
    ``[N]`` and the images that could not be read (left out)."""

    features: torch.Tensor
    labels: torch.Tensor
    unreadable: dict[str, str] = field(default_factory=dict)


def content_hash(found: Features) -> str:
    """sha256 of a cache entry's content: its tensors and the images it left out."""
    h = hashlib.sha256()
    _hash_tensor(h, "features", found.features)
    _hash_tensor(h, "labels", found.labels)
    h.update(json.dumps(found.unreadable, sort_keys=True).encode())
    return h.hexdigest()


def integrity(found: Features, checksum: str | None, items: list[Item] | None) -> str | None:
    """What is wrong with a cache entry read from disk, or None: its content must have
    the ``checksum`` written with it, and (given the ``items`` it is of) one row per
    readable item with that item's label, in order."""
    if checksum is None:
        return "it has no checksum"
    if checksum != content_hash(found):
        return "its checksum differs: the file changed after it was written"
    feats, labels, left_out = found.features, found.labels, found.unreadable
    if labels.dim() != 1 or labels.is_floating_point() or not feats.is_floating_point() or feats.dim() not in (2, 3) \
            or feats.shape[-2] != labels.shape[0] or not isinstance(left_out, dict):
        return (f"features {list(feats.shape)} ({feats.dtype}) and labels {list(labels.shape)} ({labels.dtype}) "
                "are not one row and one class index per image")
    if items is None:
        return None
    if not set(left_out) <= {str(it.path) for it in items}:
        return "it names unreadable images that are not among the items"
    expected = [it.label for it in items if str(it.path) not in left_out]
    if labels.shape[0] != len(expected):
        return f"it holds {labels.shape[0]} rows for {len(expected)} readable images"
    if not torch.equal(labels.long(), torch.tensor(expected, dtype=torch.long)):
        wrong = int((labels.long() != torch.tensor(expected, dtype=torch.long)).sum())
        return f"{wrong} of its {len(expected)} labels are not those of the images"
    return None


@dataclass
class FeatureStore:
    """Features of this run in memory, and in ``folder`` when one is given."""

    folder: Path | None = None
    log: Callable[[str], None] = lambda msg: None
    _memory: dict[str, Features] = field(default_factory=dict)
    _weights: dict[int, str] = field(default_factory=dict)
    #: ``(kind, "memory" | "disk" | "computed")`` of each lookup (for logs and tests).
    events: list[tuple[str, str]] = field(default_factory=list)

    def key(self, backbone: torch.nn.Module, items: list[Item], what: dict) -> str:
        """The address of features of ``items`` computed as ``what`` says
        (transform, precision, device, K...) with ``backbone``."""
        if id(backbone) not in self._weights:
            # hashing a ViT-B/16 takes about a second, once per run; in memory the object is the key
            self._weights[id(backbone)] = weights_hash(backbone) if self.folder is not None else f"id{id(backbone)}"
        payload = {"format": FORMAT, "weights": self._weights[id(backbone)], "items": items_fingerprint(items),
                   **what}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str, kind: str, compute: Callable[[], Features], unreadable: UnreadableImages,
            items: list[Item] | None = None) -> Features:
        """The features under ``key`` (of ``items``): from memory, from disk (if it
        passes its :func:`integrity` check), or ``compute()``d (then kept in memory and
        written to disk). Images left out are recorded in ``unreadable`` whichever way
        the features come."""
        found = self._memory.get(key)
        source = "memory"
        if found is None and self.folder is not None:
            found = self._load(key, items)
            source = "disk"
        if found is None:
            found = compute()
            source = "computed"
            if self.folder is not None:
                self._save(key, kind, found)
        self._memory[key] = found
        self.events.append((kind, source))
        for path, reason in found.unreadable.items():
            unreadable.add(Unreadable(path, reason))
        if source == "disk":
            self.log(f"{kind}: frozen features read from {self.folder}")
        return found

    def path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def _load(self, key: str, items: list[Item] | None = None) -> Features | None:
        """The entry under ``key`` if it is there, readable and whole; None otherwise
        (saying why: it is computed again and replaced)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            found = Features(tensors["features"], tensors["labels"], json.loads(meta.get("unreadable", "{}")))
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            self.log(f"{path}: unreadable feature cache ({exc}); computing it again and replacing it")
            return None
        problem = integrity(found, meta.get("sha256"), items)
        if problem:
            self.log(f"{path}: feature cache entry fails its integrity check ({problem}); "
                     "computing it again and replacing it")
            return None
        return found

    def _save(self, key: str, kind: str, found: Features) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        content = Features(found.features.detach().cpu().contiguous(), found.labels.detach().cpu().contiguous(),
                           found.unreadable)
        meta = {"kind": kind, "format": str(FORMAT), "unreadable": json.dumps(found.unreadable),
                "sha256": content_hash(content)}
        with atomic_file(self.path(key), sync=True) as tmp:
            save_file({"features": content.features, "labels": content.labels}, str(tmp), metadata=meta)
