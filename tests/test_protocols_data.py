"""Protocols (few-shot, base-to-novel) and data loading (layouts, sampling, transforms)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlprompt_core.api import ClassSet, DatasetSplits, Item, ProtocolContext
from vlprompt_core.builtin.protocols import (
    base2novel_plan,
    base2novel_summary,
    few_shot_plan,
    FewShotOptions,
    harmonic_mean,
    split_base_novel,
    subsample,
    transfer_summary,
)
from vlprompt_core.data import (
    ImageDataset,
    load_class_folders,
    load_csv,
    load_split_file,
    sample_few_shot,
    test_transform as make_test_transform,
    train_transform,
)
from vlprompt_core.errors import UserError


def make_items(n_classes: int, per_class: int, split: str = "train") -> list[Item]:
    """Fake items whose path records their original label."""
    return [Item(Path(f"/data/{split}/c{c}_{i}.png"), c) for c in range(n_classes) for i in range(per_class)]


def make_dataset(n_classes: int, per_class=(6, 3, 2), name="fake") -> DatasetSplits:
    classes = ClassSet([f"class{c}" for c in range(n_classes)], ["a photo of a {}."])
    return DatasetSplits(
        name, classes, make_items(n_classes, per_class[0], "train"),
        make_items(n_classes, per_class[1], "val"), make_items(n_classes, per_class[2], "test"),
    )


def ctx(ds, seed=1) -> ProtocolContext:
    return ProtocolContext(ds, seed, lambda section: pytest.fail("no other dataset expected"))


def original_label(item: Item) -> int:
    return int(item.path.name.split("_")[0][1:])


# ------------------------------------------------------------- base / novel


@pytest.mark.parametrize(
    "n, base, novel",
    [(6, [0, 1, 2], [3, 4, 5]), (5, [0, 1, 2], [3, 4]), (1, [0], []), (2, [0], [1]), (7, [0, 1, 2, 3], [4, 5, 6])],
)
def test_split_base_novel(n, base, novel):
    assert split_base_novel(n) == (base, novel)


def test_subsample_relabels_in_order():
    items = make_items(6, 2)
    novel = subsample(items, [3, 4, 5])
    assert [original_label(it) for it in novel] == [3, 3, 4, 4, 5, 5]
    assert [it.label for it in novel] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("n, n_base", [(6, 3), (5, 3)])
def test_base2novel_plan(n, n_base):
    ds = make_dataset(n)
    plan = base2novel_plan(FewShotOptions(shots=2), ctx(ds))
    assert plan.classes.names == [f"class{c}" for c in range(n_base)]
    assert plan.classes.templates == ds.classes.templates
    # train / val: base classes only, K and min(K, 4) per class, labels unchanged
    assert Counter(it.label for it in plan.train) == {c: 2 for c in range(n_base)}
    assert all(it.label == original_label(it) for it in plan.train + plan.val)
    assert Counter(it.label for it in plan.val) == {c: 2 for c in range(n_base)}

    base, novel = plan.evals
    assert (base.name, novel.name) == ("base", "novel")
    assert base.classes.names == plan.classes.names
    assert novel.classes.names == [f"class{c}" for c in range(n_base, n)]
    assert [it.label for it in base.items] == [original_label(it) for it in base.items]
    assert sorted({original_label(it) for it in novel.items}) == list(range(n_base, n))
    assert all(it.label == original_label(it) - n_base for it in novel.items)
    assert len(base.items) + len(novel.items) == len(ds.test)
    # the record holds the full few-shot sample, before the base split
    assert len(plan.sample["train"]) == 2 * n


def test_harmonic_mean():
    assert harmonic_mean(69.34, 74.22) == pytest.approx(71.70, abs=0.005)
    assert harmonic_mean(0, 0) == 0.0
    assert harmonic_mean(50, 50) == pytest.approx(50)
    assert harmonic_mean(100, 0) == 0.0
    assert harmonic_mean(80, 40) == pytest.approx(2 * 80 * 40 / 120)
    assert base2novel_summary(None, {"base": 80.0, "novel": 40.0}) == {
        "base": 80.0, "novel": 40.0, "H": pytest.approx(53.3333333)
    }


def test_transfer_summary_averages_targets_only():
    out = transfer_summary(None, {"src": 90.0, "a": 40.0, "b": 60.0})
    assert list(out) == ["src (source)", "a", "b", "average"]
    assert out["average"] == pytest.approx(50.0)


# ------------------------------------------------------------------ few-shot


def test_few_shot_is_reproducible_and_order_independent():
    items = make_items(4, 6)
    a = sample_few_shot(items, 3, "toy:train:3:1")
    b = sample_few_shot(list(reversed(items)), 3, "toy:train:3:1")
    assert a == b


def test_few_shot_differs_across_seeds():
    ds = make_dataset(6)
    plans = [few_shot_plan(FewShotOptions(shots=2), ctx(ds, seed)) for seed in (1, 2, 3)]
    samples = [{str(it.path) for it in p.train} for p in plans]
    assert samples[0] != samples[1] and samples[1] != samples[2]
    again = few_shot_plan(FewShotOptions(shots=2), ctx(ds, 1))
    assert again.train == plans[0].train and again.val == plans[0].val


def test_few_shot_k_per_class_without_replacement():
    items = make_items(5, 7)
    chosen = sample_few_shot(items, 4, "k")
    assert Counter(it.label for it in chosen) == {c: 4 for c in range(5)}
    assert len({it.path for it in chosen}) == len(chosen)
    assert set(chosen) <= set(items)


def test_few_shot_takes_all_when_a_class_is_short():
    items = make_items(3, 5) + [Item(Path("/data/train/c3_0.png"), 3)]
    chosen = sample_few_shot(items, 4, "k")
    counts = Counter(it.label for it in chosen)
    assert counts == {0: 4, 1: 4, 2: 4, 3: 1}
    assert sample_few_shot(items, 16, "k") == sorted(items, key=lambda it: (it.label, str(it.path)))


def test_few_shot_plan_val_is_min_k_4():
    ds = make_dataset(3, per_class=(10, 6, 1))
    plan = few_shot_plan(FewShotOptions(shots=8), ctx(ds))
    assert Counter(it.label for it in plan.train) == {0: 8, 1: 8, 2: 8}
    assert Counter(it.label for it in plan.val) == {0: 4, 1: 4, 2: 4}
    assert plan.classes is ds.classes
    assert [e.name for e in plan.evals] == ["test"] and plan.evals[0].items == ds.test
    assert plan.sample["train"] == [[str(it.path), it.label] for it in plan.train]


# ------------------------------------------------------- canonical class list


def test_classes_come_from_the_spec_not_the_training_split(tmp_path, monkeypatch):
    """A split file whose train split lacks a class still yields every class."""
    from vlprompt_core.plugins import build_registry, make_plugin_manager

    names = ["ant", "bee", "cat", "hot_dog"]
    folder = tmp_path / "data" / "gappy"
    (folder / "images").mkdir(parents=True)
    split = {
        "train": [[f"{n}_t.png", i, n] for i, n in enumerate(names) if n != "cat"],  # no cat to train on
        "val": [],
        "test": [[f"{n}_e.png", i, n] for i, n in enumerate(names)],
    }
    (folder / "split.json").write_text(json.dumps(split))
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "gappy.yaml").write_text(
        "name: gappy\nlayout: split_file\nfolder: gappy\nsplit_file: split.json\n"
        "classnames: [ant, bee, cat, hot_dog]\n"
    )
    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", str(specs))
    reg = build_registry(*make_plugin_manager())
    plugin = reg.get("dataset", "gappy")
    ds = plugin.load(plugin.options(root=tmp_path / "data"))
    assert ds.classes.names == ["ant", "bee", "cat", "hot dog"]
    assert ds.classes.templates == ["a photo of a {}."]
    assert [it.label for it in ds.train] == [0, 1, 3]
    assert [it.label for it in ds.test] == [0, 1, 2, 3]
    assert ds.test[2].path == folder / "images" / "cat_e.png"
    plan = few_shot_plan(FewShotOptions(shots=1), ctx(ds))
    assert len(plan.classes) == 4
    assert base2novel_plan(FewShotOptions(shots=1), ctx(ds)).evals[1].classes.names == ["cat", "hot dog"]


# ---------------------------------------------------------- split-file errors

CLASSES3 = ClassSet(["a", "b", "c"])


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "split file not found"),
        ('{"train": [', "not valid JSON"),
        (json.dumps({"train": [["x.png", 3, "d"]], "val": [], "test": []}), "label 3 outside 0..2"),
        (json.dumps({"train": [["x.png", -1, "a"]], "val": [], "test": []}), "label -1"),
        (json.dumps({"train": [], "val": []}), "missing list 'test'"),
        (json.dumps({"train": [["x.png", "0", "a"]], "val": [], "test": []}), "train[0]"),
    ],
    ids=["missing", "bad-json", "label-high", "label-negative", "no-test", "bad-row"],
)
def test_split_file_errors_name_the_file(tmp_path, content, words):
    path = tmp_path / "my_split.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as exc:
        load_split_file("x", path, tmp_path, CLASSES3)
    assert str(path) in str(exc.value)
    assert words in str(exc.value)


def test_split_file_loads_paths_relative_to_image_dir(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": [["sub/x.png", 2, "c"]], "val": [["y.png", 0, "a"]], "test": []}))
    ds = load_split_file("x", path, tmp_path / "imgs", CLASSES3)
    assert ds.train == [Item(tmp_path / "imgs" / "sub" / "x.png", 2)]
    assert ds.val == [Item(tmp_path / "imgs" / "y.png", 0)]
    assert ds.test == [] and ds.classes is CLASSES3


# ----------------------------------------------------------- class folders


def _touch_images(folder: Path, n: int, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 12), (i * 10, 0, 0)).save(folder / f"{prefix}{i}.png")


def test_class_folders_flat_layout_split_per_class(tmp_path):
    root = tmp_path / "mine"
    for cls in ("zebra", "apple_pie", "cat"):
        _touch_images(root / cls, 10)
    (root / "cat" / "notes.txt").write_text("not an image")
    ds = load_class_folders("mine", root, ["a {}."])
    assert ds.classes.names == ["apple pie", "cat", "zebra"]  # sorted folder names, '_' -> ' '
    assert ds.classes.templates == ["a {}."]
    for split, n in ((ds.train, 5), (ds.val, 2), (ds.test, 3)):
        assert Counter(it.label for it in split) == {0: n, 1: n, 2: n}
    everything = ds.train + ds.val + ds.test
    assert len({it.path for it in everything}) == 30
    assert all(it.path.parent.name == ["apple_pie", "cat", "zebra"][it.label] for it in everything)
    again = load_class_folders("mine", root, ["a {}."])
    assert again.train == ds.train and again.test == ds.test  # deterministic


def test_class_folders_with_split_subfolders(tmp_path):
    root = tmp_path / "mine"
    _touch_images(root / "train" / "dog", 3)
    _touch_images(root / "train" / "cat", 2)
    _touch_images(root / "test" / "dog", 1)
    _touch_images(root / "test" / "cat", 2)
    ds = load_class_folders("mine", root, ["a {}."])
    assert ds.classes.names == ["cat", "dog"]
    assert Counter(it.label for it in ds.train) == {0: 2, 1: 3}
    assert Counter(it.label for it in ds.test) == {0: 2, 1: 1}
    assert ds.val == []
    assert all(it.path.parts[-3] == "test" for it in ds.test)

    _touch_images(root / "test" / "emu", 1)
    with pytest.raises(UserError, match="emu"):
        load_class_folders("mine", root, ["a {}."])


def test_class_folders_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_class_folders("x", tmp_path / "nope", ["{}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        load_class_folders("x", tmp_path / "empty", ["{}"])


def test_folder_dataset_plugin(tmp_path, registry):
    _touch_images(tmp_path / "mine" / "a", 4)
    _touch_images(tmp_path / "mine" / "b", 4)
    plugin = registry.get("dataset", "folder")
    ds = plugin.load(plugin.options(path=tmp_path / "mine"))
    assert ds.name == "mine" and ds.classes.names == ["a", "b"]
    with pytest.raises(ValueError, match="dataset folder not found"):
        plugin.options(path=tmp_path / "missing")


# --------------------------------------------------------------------- CSV


def test_csv_loader(tmp_path):
    (tmp_path / "imgs").mkdir()
    path = tmp_path / "list.csv"
    path.write_text(
        "path,class,split\n"
        "a.png,zebra,train\n"
        "b.png,ant,train\n"
        "c.png,big_cat,val\n"
        "d.png,zebra,test\n"
    )
    ds = load_csv("list", path, None, ["a {}."])
    assert ds.classes.names == ["ant", "big cat", "zebra"]
    assert ds.train == [Item(tmp_path / "a.png", 2), Item(tmp_path / "b.png", 0)]
    assert ds.val == [Item(tmp_path / "c.png", 1)]
    assert ds.test == [Item(tmp_path / "d.png", 2)]
    moved = load_csv("list", path, tmp_path / "imgs", ["a {}."])
    assert moved.train[0].path == tmp_path / "imgs" / "a.png"


def test_csv_errors(tmp_path):
    with pytest.raises(UserError, match="CSV file not found"):
        load_csv("x", tmp_path / "nope.csv", None, ["{}"])
    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text("file,class\na.png,x\n")
    with pytest.raises(UserError, match="missing column.*path.*split"):
        load_csv("x", bad_cols, None, ["{}"])
    bad_split = tmp_path / "split.csv"
    bad_split.write_text("path,class,split\na.png,x,train\nb.png,x,holdout\n")
    with pytest.raises(UserError) as exc:
        load_csv("x", bad_split, None, ["{}"])
    assert f"{bad_split}:3" in str(exc.value) and "holdout" in str(exc.value)


# -------------------------------------------------------------- transforms


def test_train_transform_is_the_reference_one():
    from torchvision import transforms as T

    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    tf = train_transform(16, mean, std)
    crop, flip, to_tensor, norm = tf.transforms
    assert isinstance(crop, T.RandomResizedCrop)
    assert crop.size == (16, 16)
    assert crop.scale == (0.08, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(to_tensor, T.ToTensor)
    assert isinstance(norm, T.Normalize) and tuple(norm.mean) == mean and tuple(norm.std) == std
    out = tf(Image.new("RGB", (40, 24), (255, 0, 0)))
    assert out.shape == (3, 16, 16)


def test_test_transform_is_resize_and_centre_crop(tiny_backbone):
    from torchvision import transforms as T

    bb = tiny_backbone
    tf = make_test_transform(bb.image_size, bb.image_mean, bb.image_std)
    resize, crop, _, norm = tf.transforms
    assert isinstance(resize, T.Resize) and resize.size == bb.image_size
    assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(crop, T.CenterCrop) and crop.size == (bb.image_size, bb.image_size)
    assert tuple(norm.mean) == bb.image_mean and tuple(norm.std) == bb.image_std
    # a 32x16 image: left half black, right half white -> centre crop keeps the middle
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 16))
    out = tf(img)
    assert out.shape == (3, 16, 16)
    mean = torch.tensor(bb.image_mean)[:, None, None]
    std = torch.tensor(bb.image_std)[:, None, None]
    pixels = out * std + mean
    assert pixels[:, :, :6].max() < 0.05 and pixels[:, :, 10:].min() > 0.95


def test_image_dataset_reads_and_reports_missing_files(tmp_path):
    _touch_images(tmp_path, 1)
    tf = make_test_transform(16, (0.0,) * 3, (1.0,) * 3)
    ds = ImageDataset([Item(tmp_path / "img0.png", 3), Item(tmp_path / "gone.png", 0)], tf)
    assert len(ds) == 2
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 3
    with pytest.raises(UserError, match="gone.png"):
        ds[1]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png: cannot read image"):
        ImageDataset([Item(tmp_path / "broken.png", 0)], tf)[0]


def test_embedded_dataset_is_generated_once_and_again_when_the_generator_changes(tmp_path, monkeypatch):
    from vlprompt_core.builtin import datasets as ds

    calls = []

    def fake_write_task(task, dest):
        dest.mkdir(parents=True)
        (dest / "split.json").write_text("{}")
        calls.append(task)

    monkeypatch.setattr("vlprompt_core.embedded.tasks.write_task", fake_write_task)
    folder = tmp_path / "data" / "embedded_objects"
    ds.ensure_embedded("objects", folder)
    ds.ensure_embedded("objects", folder)
    assert calls == ["objects"]
    (folder / ".generator").write_text("made by an older generator\n")
    ds.ensure_embedded("objects", folder)
    assert calls == ["objects", "objects"]
    assert (folder / ".generator").read_text().strip() == ds.embedded_fingerprint("objects")
