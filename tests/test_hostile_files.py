"""Hostile or unusual files: images that are corrupt, exotic or bombs, and lists of
images whose paths lead out of the folder they are relative to. Each is read
correctly or reported with its path and reason, never a traceback."""

from __future__ import annotations

import json
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlprompt_core.api import ClassSet
from vlprompt_core.data import (
    ImageLoader,
    Unreadable,
    load_csv,
    load_json_list,
    load_split_file,
    read_rgb,
    scan_image_lists,
    scan_split_file,
)
from vlprompt_core.data import test_transform as make_test_transform
from vlprompt_core.errors import UserError

# ------------------------------------------------------------------ images


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` greyscale pixels, with one
    tiny data chunk: opening it reads the header, decoding it would need the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _noise(mode: str = "RGB", size=(24, 24)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(mode)


def _truncated(path: Path, fmt: str) -> None:
    _noise(size=(64, 64)).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _grey16(path: Path) -> None:
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(path)


def _palette_with_transparency(path: Path) -> None:
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.paste(1, (0, 0, 4, 8))
    im.save(path, transparency=0)


MAKERS = {
    "truncated.jpg": lambda p: _truncated(p, "JPEG"),
    "truncated.png": lambda p: _truncated(p, "PNG"),
    "empty.png": lambda p: p.write_bytes(b""),
    "text.png": lambda p: p.write_text("not an image, a text file named .png\n"),
    "bomb.png": lambda p: p.write_bytes(_png_header_only(100_000, 100_000)),
    "large.png": lambda p: p.write_bytes(_png_header_only(10_000, 10_000)),  # Pillow only warns at this size
    "cmyk.jpg": lambda p: Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p),
    "grey16.png": _grey16,
    "palette_transparency.png": _palette_with_transparency,
    "rgba.png": lambda p: _noise("RGBA").save(p),
    "la.png": lambda p: _noise("LA").save(p),
    "bilevel.png": lambda p: _noise("1").save(p),
}

#: What each unreadable file's reason says.
UNREADABLE = {
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "empty.png": "empty file",
    "text.png": "not an image file",
    "bomb.png": "decompression bomb",
    "large.png": "decompression bomb",
}


def _make(name: str, folder: Path) -> Path:
    path = folder / name
    MAKERS[name](path)
    return path


@pytest.mark.parametrize("name", list(MAKERS))
def test_read_rgb_reads_or_explains_each_file(name, tmp_path):
    path = _make(name, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning escapes either
        result = read_rgb(path)
    if name in UNREADABLE:
        assert isinstance(result, Unreadable), result
        assert result.path == str(path)
        assert result.reason.startswith("cannot read image (") and UNREADABLE[name] in result.reason, result.reason
        assert "\n" not in result.message()
        return
    assert isinstance(result, Image.Image) and result.mode == "RGB"
    pixels = np.asarray(result)
    if name == "cmyk.jpg":
        assert tuple(pixels[8, 8]) == pytest.approx((255, 0, 0), abs=8)  # no cyan, full magenta and yellow: red
    if name == "palette_transparency.png":
        assert tuple(pixels[0, 0]) == (0, 0, 255) and tuple(pixels[0, 7]) == (255, 0, 0)


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    path = _make("grey16.png", tmp_path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # 16 bits per pixel on disk
    pixels = np.asarray(read_rgb(path))
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    ramp = pixels[..., 0].ravel().astype(int)
    assert ramp[0] == 0 and ramp[-1] == 255
    assert abs(ramp[len(ramp) // 2] - 128) <= 1  # the middle of the range is mid-grey, not white
    assert (np.diff(ramp) >= 0).all() and len(set(ramp)) > 200


def test_a_missing_file_is_reported_too(tmp_path):
    result = read_rgb(tmp_path / "gone.png")
    assert result == Unreadable(str(tmp_path / "gone.png"), "image file not found")


@pytest.mark.parametrize("share", [None, (0, 1), (0, 2), (1, 2)])
def test_a_training_batch_left_empty_by_skipped_images_is_refused_only_where_other_processes_step(share, tmp_path):
    """Under ``skip`` a batch with no readable image is left out of training, but a process
    of a run over several cannot leave out a step the others take (their gradients are
    summed with its own): that is one line naming the files, never a hang."""
    from vlprompt_core.api import Item

    good = tmp_path / "good.png"
    _noise().save(good)
    bad = [_make(name, tmp_path) for name in ("empty.png", "text.png")]
    tf = make_test_transform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    items = [Item(bad[0], 0), Item(bad[1], 1), Item(good, 0)]
    for seed in range(8):  # shuffled batches: either order
        loader = ImageLoader(items[:2], tf, batch_size=2, shuffle=True, seed=seed, on_unreadable="skip", share=share)
        if share is not None and share[1] > 1:
            with pytest.raises(UserError) as exc:
                list(loader)
            [line] = exc.value.problems
            assert f"every image of process {share[0]}'s share of a training batch is unreadable (" in line
            assert str(bad[0]) in line or str(bad[1]) in line
            assert "run over 2 processes" in line and "\n" not in line
        else:
            assert list(loader) == []  # one process: the batch is left out, the images counted
            assert len(loader.unreadable) == 2
        mixed = ImageLoader([items[0], items[2]], tf, batch_size=2, shuffle=True, seed=seed, on_unreadable="skip",
                            share=share)
        if share is None or share[1] == 1:
            assert [labels.tolist() for _, labels in mixed] == [[0]]
        else:  # one process's share is the readable image, the other's the unreadable one
            refused = ImageLoader([items[0], items[2]], tf, batch_size=2, shuffle=True, seed=seed,
                                  on_unreadable="skip", share=(1 - share[0], 2))
            outcomes = []
            for one in (mixed, refused):
                try:
                    outcomes.append(len(list(one)))
                except UserError:
                    outcomes.append("refused")
            assert sorted(outcomes, key=str) == [1, "refused"]


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_image_loader_reads_skips_or_stops_on_each_file(name, policy, tmp_path):
    from vlprompt_core.api import Item

    good = tmp_path / "good.png"
    _noise().save(good)
    path = _make(name, tmp_path)
    tf = make_test_transform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    loader = ImageLoader([Item(good, 0), Item(path, 1)], tf, batch_size=2, on_unreadable=policy)
    if name not in UNREADABLE:
        [(images, labels)] = list(loader)
        assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]
        assert len(loader.unreadable) == 0
        return
    if policy == "error":
        with pytest.raises(UserError) as exc:
            list(loader)
        [line] = exc.value.problems
        assert line.startswith(f"{path}: cannot read image (") and UNREADABLE[name] in line
        assert "unreadable_images: skip" in line and "\n" not in line
        return
    [(images, labels)] = list(loader)
    assert images.shape == (1, 3, 8, 8) and labels.tolist() == [0]
    assert list(loader.unreadable.reasons) == [str(path)]
    assert UNREADABLE[name] in loader.unreadable.reasons[str(path)]


# ------------------------------------------------- paths in lists of images

ESCAPES = ["../outside.png", "/etc/passwd", "a/../../outside.png", "a/b/../../../outside.png"]


@pytest.mark.parametrize("escape", ESCAPES)
def test_split_file_paths_must_stay_in_the_image_folder(escape, tmp_path):
    images = tmp_path / "ds" / "images"
    images.mkdir(parents=True)
    split_file = tmp_path / "ds" / "split.json"
    split_file.write_text(json.dumps({
        "train": [["a/0.png", 0, "a"], ["a/../b/1.png", 1, "b"], [escape, 1, "b"]],  # a/../b stays inside
        "val": [], "test": [[str(images / "a" / "2.png"), 0, "a"]],  # absolute, but inside
    }))
    classes = ClassSet(["a", "b"])
    scan = scan_split_file(split_file, images, classes)
    assert scan.problems == [(f"{split_file}: train[2]: image path {escape!r} leads out of the image folder "
                              f"{images}; split-file paths are relative to it, without '..'")]
    assert [it.path for it in scan.splits["train"]] == [images / "a/0.png", images / "a/../b/1.png"]
    with pytest.raises(UserError) as exc:
        load_split_file("ds", split_file, images, classes)
    assert exc.value.problems == scan.problems


def test_every_escaping_row_is_counted_in_one_line(tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": [[e, 0, "a"] for e in ESCAPES], "val": [], "test": []}))
    [line] = scan_split_file(split_file, tmp_path / "images", ClassSet(["a"])).problems
    assert line.startswith(f"{split_file}: train[0]: image path '../outside.png' leads out of")
    assert "(4 rows in all)" in line


def test_image_list_ids_must_stay_in_the_image_folder(tmp_path):
    (tmp_path / "train.txt").write_text("0001 a\n../../etc/passwd a\n")
    (tmp_path / "test.txt").write_text("0002 a\n")
    scan = scan_image_lists(tmp_path, tmp_path / "images", {"train": "train.txt", "test": "test.txt"}, ".jpg",
                            ClassSet(["a"]))
    assert scan.problems == [(f"{tmp_path / 'train.txt'}: image id(s) leading out of the image folder "
                              f"{tmp_path / 'images'}: line 2 '../../etc/passwd'; ids name images in it, without '..'")]
    assert [it.path.name for it in scan.splits["train"] + scan.splits["test"]] == ["0001.jpg", "0002.jpg"]


@pytest.mark.parametrize("escape", ESCAPES)
def test_csv_and_json_list_paths_must_stay_under_their_root(escape, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    csv_file = lists / "list.csv"
    csv_file.write_text(f"path,class\na.png,a\n{escape},b\n")
    with pytest.raises(UserError) as exc:
        load_csv("list", csv_file, None, ["{}"])
    assert exc.value.problems == [(f"{csv_file}:3: image path {escape!r} leads out of {lists}, the folder the "
                                   "paths are relative to; set image_root to a folder that holds every image")]
    json_file = lists / "list.json"
    json_file.write_text(json.dumps([["a.png", "a"], {"path": escape, "class": "b"}]))
    with pytest.raises(UserError, match=rf"^{re.escape(str(json_file))}: entry 1: image path .* leads out of "):
        load_json_list("list", json_file, None, ["{}"])
    split_json = lists / "split.json"
    split_json.write_text(json.dumps({"train": [["a.png", 0, "a"], [escape, 1, "b"]], "val": [], "test": []}))
    with pytest.raises(UserError, match=rf"^{re.escape(str(split_json))}: train\[1\]: image path .* leads out of "):
        load_json_list("list", split_json, None, ["{}"])


def test_paths_relative_to_the_list_stay_valid_under_a_wider_image_root(tmp_path):
    """A list beside its images, or one level down with image_root above both."""
    lists = tmp_path / "lists"
    lists.mkdir()
    csv_file = lists / "list.csv"
    csv_file.write_text(f"path,class\nimages/a.png,a\n{tmp_path / 'images' / 'b.png'},b\n")
    ds = load_csv("list", csv_file, tmp_path, ["{}"])
    assert sorted(it.path for it in ds.train + ds.val + ds.test) == [tmp_path / "images/a.png",
                                                                    tmp_path / "images/b.png"]
