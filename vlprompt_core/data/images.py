"""Images from disk to tensors: the reference train and test transforms, reading one
image as RGB whatever the file holds (:func:`read_rgb`: an image, or an
:class:`Unreadable` saying why not), the ``(image tensor, label)`` dataset over
items, the collation that leaves unreadable images out of a batch, and the record of
the images a run left out (:class:`UnreadableImages`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..api import Item
from ..errors import UserError


# ----------------------------------------------------------------- transforms


def train_transform(size: int, mean, std, scale: tuple[float, float] = (0.08, 1.0)):
    """Reference train transform: random resized crop (scale 0.08-1, bicubic) + flip."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def test_transform(size: int, mean, std):
    """Reference test transform: resize the shorter side (bicubic) + centre crop."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


@dataclass(frozen=True)
class Unreadable:
    """An image that could not be read, in place of its pixels in a batch."""

    path: str
    reason: str

    def message(self) -> str:
        return f"{self.path}: {self.reason}"


#: Pillow modes of 16-bit greyscale (and 32-bit ``I``, as some Pillow versions open 16-bit PNGs).
_WIDE_GREY = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def _to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB. Pillow's own conversion clips 16-bit greyscale at 255
    (a white image), so it is scaled to 8 bits here; a palette with transparency
    goes through RGBA (as Pillow asks), the alpha dropped as by ``convert("RGB")``."""
    if im.mode in _WIDE_GREY:
        wide = np.asarray(im).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def read_rgb(path: Path) -> Image.Image | Unreadable:
    """The image at ``path`` as RGB, or why it cannot be read.

    Whatever the file holds, the outcome is one of the two: a truncated, empty or
    non-image file, or one whose header claims more pixels than Pillow's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; refused before decoding,
    not after Pillow's warning), is an :class:`Unreadable` with the reason."""
    try:
        if Path(path).stat().st_size == 0:
            return Unreadable(str(path), "cannot read image (empty file)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return _to_rgb(im)
    except FileNotFoundError:
        return Unreadable(str(path), "image file not found")
    except IsADirectoryError:
        return Unreadable(str(path), "cannot read image (a folder, not a file)")
    except UnidentifiedImageError:
        return Unreadable(str(path), "cannot read image (not an image file, or a format Pillow cannot read)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Unreadable(str(path), f"cannot read image (refused: {exc})")
    except Exception as exc:  # noqa: BLE001 - a decoder fails in many ways on a corrupt file: each is the file's
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Unreadable(str(path), f"cannot read image ({detail})")


class ImageDataset(torch.utils.data.Dataset):
    """``(image tensor, label)`` pairs read from disk.

    An image that cannot be read raises a one-line :class:`UserError` naming it;
    with ``defer_errors`` it comes back as an :class:`Unreadable` instead, so that a
    data-loader worker never raises (see :class:`ImageLoader`)."""

    def __init__(self, items: list[Item], transform, defer_errors: bool = False):
        self.items = items
        self.transform = transform
        self.defer_errors = defer_errors

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        img = read_rgb(item.path)
        if isinstance(img, Unreadable):
            if self.defer_errors:
                return img, item.label
            raise UserError(img.message())
        return self.transform(img), item.label


def collate_readable(batch):
    """``(images, labels, unreadable)``: the readable images stacked, and the
    :class:`Unreadable` entries left out (``images`` is None if none was readable)."""
    good = [(x, y) for x, y in batch if not isinstance(x, Unreadable)]
    bad = [x for x, _ in batch if isinstance(x, Unreadable)]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([y for _, y in good], dtype=torch.long), bad


class UnreadableImages:
    """Images left out of a run because they could not be read (each once)."""

    def __init__(self):
        self.reasons: dict[str, str] = {}

    def add(self, image: Unreadable) -> None:
        self.reasons.setdefault(image.path, image.reason)

    def __len__(self) -> int:
        return len(self.reasons)

    def summary(self, shown: int = 20) -> dict:
        """For ``results.json``: how many, and the first ``shown`` with the reason."""
        return {"count": len(self.reasons),
                "examples": [{"path": p, "reason": r} for p, r in list(self.reasons.items())[:shown]]}
