"""Datasets: the benchmark spec files, ``vlprompt data list/check`` on miniature fake
copies of their layouts and on broken copies (each with its own message), custom
datasets without code, the prompt ensemble as the reference code uses it, transfer
and domain generalisation from a fake ImageNet (200-class subset scoring), and
unreadable images at run time."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from test_cli import vlprompt, vlprompt_process

from vlprompt_core import hookimpl
from vlprompt_core.api import ClassSet, Item, MethodEntry, MethodOutput, Options, PromptMethod, ProtocolContext
from vlprompt_core.builtin.protocols import FewShotOptions, base2novel_plan, few_shot_plan
from vlprompt_core.builtin.zeroshot import ZeroShotCLIP, ZeroShotOptions
from vlprompt_core.data import ImageLoader
from vlprompt_core.data import test_transform as make_test_transform
from vlprompt_core.datacheck import check_named, list_datasets
from vlprompt_core.engine import Engine
from vlprompt_core.errors import UserError
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.prompting import ENSEMBLE_TEMPLATES, class_text_features, templates_for
from vlprompt_core.spec import validate_spec
from vlprompt_core.testing.benchmarks import builtin_specs, class_colour, write_fake_dataset

#: name: (classes, zero-shot template) -- templates as in CoOp's trainers/zsclip.py CUSTOM_TEMPLATES
BENCHMARKS = {
    "imagenet": (1000, "a photo of a {}."),
    "caltech101": (100, "a photo of a {}."),
    "oxford_pets": (37, "a photo of a {}, a type of pet."),
    "stanford_cars": (196, "a photo of a {}."),
    "oxford_flowers": (102, "a photo of a {}, a type of flower."),
    "food101": (101, "a photo of {}, a type of food."),
    "fgvc_aircraft": (100, "a photo of a {}, a type of aircraft."),
    "sun397": (397, "a photo of a {}."),
    "dtd": (47, "{} texture."),
    "eurosat": (10, "a centered satellite photo of {}."),
    "ucf101": (101, "a photo of a person doing {}."),
    "imagenet_v2": (1000, "a photo of a {}."),
    "imagenet_sketch": (1000, "a photo of a {}."),
    "imagenet_a": (200, "a photo of a {}."),
    "imagenet_r": (200, "a photo of a {}."),
}


@pytest.fixture(scope="module")
def specs():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VLPROMPT_DATASETS_SPEC", raising=False)
        return builtin_specs()


@pytest.fixture(scope="module")
def reg(world):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
        return build_registry(*make_plugin_manager())


@pytest.fixture(scope="module")
def fakes(specs, tmp_path_factory):
    """One tiny image per class in every split of every benchmark's layout."""
    root = tmp_path_factory.mktemp("benchmarks")
    for name in BENCHMARKS:
        write_fake_dataset(specs[name], root)
    return root


def load(reg, name, root, **options):
    entry = reg.get("dataset", name)
    return entry.load(entry.options(root=root, **options))


# ------------------------------------------------------------- the spec files


def test_every_benchmark_has_a_spec_with_classes_templates_and_the_ensemble(specs):
    for name, (n, template) in BENCHMARKS.items():
        s = specs[name]
        assert len(s.classnames) == n, name
        assert s.templates == [template], name
        # ZeroshotCLIP2: the 7 selected ImageNet templates, plus the dataset's own except for ImageNet
        assert s.ensemble == ENSEMBLE_TEMPLATES + ([] if name == "imagenet" else [template]), name
        assert s.title and s.source and s.obtain.strip() and s.quirks.strip(), name
        assert s.sizes, name
    # split sizes checked on copies of the split files (methods.md 9.1)
    assert specs["oxford_pets"].sizes == {"train": 2944, "val": 736, "test": 3669}
    assert specs["caltech101"].sizes == {"train": 4128, "val": 1649, "test": 2465}
    assert specs["eurosat"].sizes == {"train": 13500, "val": 5400, "test": 8100}
    # quirks carried by the class lists
    caltech = specs["caltech101"].classnames
    assert caltech[:5] == ["face", "leopard", "motorbike", "accordion", "airplane"]
    assert not {"BACKGROUND_Google", "Faces_easy", "background google"} & set(caltech)
    assert specs["eurosat"].classnames[:4] == ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land",
                                               "Highway or Road"]
    aircraft = specs["fgvc_aircraft"].classnames
    assert aircraft[:3] == ["707-320", "727-200", "737-200"] and aircraft[-1] == "Yak-42"
    assert {"F-16A/B", "F/A-18", "BAE 146-200"} <= set(aircraft)
    assert specs["sun397"].classnames[8:10] == ["outdoor apartment_building", "indoor apse"]
    assert specs["stanford_cars"].classnames[0] == "2000 AM General Hummer SUV"
    assert specs["ucf101"].classnames[0] == "Apply_Eye_Makeup"
    assert specs["food101"].classnames[:2] == ["apple_pie", "baby_back_ribs"]


def test_imagenet_variants_map_onto_imagenet_labels(specs):
    inet = specs["imagenet"]
    wnids = inet.class_dirs
    assert len(set(wnids)) == 1000 and wnids == sorted(wnids)  # label = position in sorted-wnid order
    assert (wnids[0], inet.classnames[0]) == ("n01440764", "tench")
    for name in ("imagenet_a", "imagenet_r"):
        s = specs[name]
        assert s.test_only and s.parent == "imagenet"
        assert len(s.parent_labels) == 200 and s.parent_labels == sorted(s.parent_labels)
        assert s.class_dirs == sorted(s.class_dirs)  # their labels 0..199 follow the sorted wnids too
        assert s.class_dirs == [wnids[i] for i in s.parent_labels]
        assert s.classnames == [inet.classnames[i] for i in s.parent_labels]
    assert specs["imagenet_a"].parent_labels[:3] == [6, 11, 13]  # stingray, goldfinch, junco
    assert specs["imagenet_r"].parent_labels[:3] == [1, 2, 4]  # goldfish, great white shark, hammerhead
    assert specs["imagenet_v2"].class_dir_list() == [str(i) for i in range(1000)]
    assert specs["imagenet_sketch"].class_dirs == wnids
    assert specs["imagenet_v2"].classnames == specs["imagenet_sketch"].classnames == inet.classnames


def test_a_subset_spec_that_disagrees_with_its_parent_is_reported(tmp_path, monkeypatch):
    from vlprompt_core.builtin.datasets import read_spec_files

    (tmp_path / "mini.yaml").write_text(
        "name: mini\nlayout: class_folders\nfolder: mini\ntest_only: true\nparent: imagenet\n"
        "parent_labels: [0, 1]\nclassnames: [tench, carp]\n"
    )
    (tmp_path / "orphan.yaml").write_text("name: orphan\nlayout: class_folders\nfolder: o\nparent: imagenet_x\n")
    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", str(tmp_path))
    entries, problems = read_spec_files()
    assert f"{tmp_path / 'mini.yaml'}: classnames[1] is 'carp', but imagenet's label 1 is 'goldfish' (1 such)" in problems
    assert f"{tmp_path / 'orphan.yaml'}: parent 'imagenet_x': no such dataset spec" in problems
    assert {"mini", "orphan"}.isdisjoint(e.name for e in entries)


# ------------------------------------------------------------ prompt ensemble


def test_prompt_ensemble_as_the_reference_code_uses_it(reg, fakes, tiny_backbone):
    imagenet = load(reg, "imagenet", fakes).classes
    pets = load(reg, "oxford_pets", fakes)
    assert templates_for("ensemble", imagenet) == ENSEMBLE_TEMPLATES  # the 7 alone
    assert len(ENSEMBLE_TEMPLATES) == 7 and "a photo of a {}." not in ENSEMBLE_TEMPLATES
    assert templates_for("dataset", imagenet) == ["a photo of a {}."]
    assert templates_for("ensemble", pets.classes) == ENSEMBLE_TEMPLATES + ["a photo of a {}, a type of pet."]
    # a dataset without an ensemble of its own: its templates, then the 7
    assert templates_for("ensemble", ClassSet(["x"], ["x {}."])) == ["x {}."] + ENSEMBLE_TEMPLATES

    sub = replace(imagenet, names=imagenet.names[:12])
    zs = ZeroShotCLIP(tiny_backbone, sub, ZeroShotOptions(templates="ensemble"))
    torch.testing.assert_close(zs.text_features, class_text_features(tiny_backbone, sub.names, ENSEMBLE_TEMPLATES))
    with_own = class_text_features(tiny_backbone, sub.names, ENSEMBLE_TEMPLATES + ["a photo of a {}."])
    assert (zs.text_features - with_own).abs().max() > 1e-4  # the published ImageNet ensemble is not 8 templates

    # novel classes and transfer targets keep their dataset's ensemble
    plan = base2novel_plan(FewShotOptions(shots=1), ProtocolContext(pets, 1, None))
    assert plan.classes.ensemble == plan.evals[1].classes.ensemble == pets.classes.ensemble
    # the dataset section may replace it
    mine = load(reg, "oxford_pets", fakes, ensemble=["a {} pet."]).classes
    assert templates_for("ensemble", mine) == ["a {} pet."]


# --------------------------------------------------------- data check / list


def _expected_counts(spec) -> dict[str, int]:
    n = len(spec.classnames)
    if spec.layout == "imagenet":
        return {"train": n, "val": 0, "test": n}
    if spec.test_only:
        return {"train": 0, "val": 0, "test": n}
    return {"train": n, "val": n, "test": n}


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_data_check_passes_on_a_fake_copy(name, reg, specs, fakes):
    report = check_named(reg, name, fakes, sample=8)
    assert report.ok, report.problems
    counts = _expected_counts(specs[name])
    for split, n in counts.items():
        line = next(x for x in report.lines if x.strip().startswith(split))
        assert (f"{n:,} images" in line) if n else line.split() == [split, "-"], line
    assert f"  files     {sum(counts.values()):,} listed, all present" in report.lines
    assert "  decoding  8 sampled images, all readable" in report.lines
    assert f"  classes   {len(specs[name].classnames)}" in report.lines


def test_data_list_shows_every_dataset_found_and_its_split_sizes(fakes, world):
    proc = vlprompt("data", "list", "--root", str(fakes), "--json", env_extra={"VLPROMPT_DATASETS_SPEC": ""})
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert set(BENCHMARKS) | {"embedded_objects", "embedded_objects_shifted", "embedded_objects_closeup", "folder", "csv", "json"} == set(rows)
    assert rows["imagenet"]["counts"] == {"train": 1000, "val": 0, "test": 1000}
    assert rows["imagenet_a"]["counts"] == {"train": 0, "val": 0, "test": 200}
    assert rows["fgvc_aircraft"]["counts"] == {"train": 100, "val": 100, "test": 100}
    assert all(rows[n]["state"] == "found" and rows[n]["classes"] == BENCHMARKS[n][0] for n in BENCHMARKS)
    assert rows["embedded_objects"]["state"] == "generated on first use"
    assert rows["folder"]["kind"] == "custom"

    empty = fakes.parent / "no-data-here"
    empty.mkdir(exist_ok=True)
    proc = vlprompt("data", "list", "--root", str(empty), env_extra={"VLPROMPT_DATASETS_SPEC": "",
                                                                     "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    table = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    for name in BENCHMARKS:
        assert "not found" in table[name], name
    assert "generated on first use" in table["embedded_objects_shifted"]


def _copy(fakes: Path, spec, dest: Path) -> Path:
    shutil.copytree(fakes / spec.folder, dest / spec.folder)
    return dest / spec.folder


def _split_json(folder, spec):
    return json.loads((folder / spec.split_file).read_text())


def _save_split_json(folder, spec, data):
    (folder / spec.split_file).write_text(json.dumps(data))


def break_missing_images(folder, spec):
    for label in (0, 5, 9):
        (folder / "images" / f"c{label:04d}" / f"test_{label:04d}_0.png").unlink()


def break_class_count_folders(folder, spec):
    shutil.rmtree(folder / "images" / "train" / "n01440764")


def break_class_count_split_file(folder, spec):
    data = _split_json(folder, spec)
    _save_split_json(folder, spec, {k: [r for r in v if r[1] != 46] for k, v in data.items()})


def break_malformed_split_file(folder, spec):
    text = (folder / spec.split_file).read_text()
    (folder / spec.split_file).write_text(text[: len(text) // 2])


def break_flat_imagenet_val(folder, spec):
    val = folder / "images" / "val"
    for d in list(val.iterdir()):
        for f in d.iterdir():
            f.rename(val / f.name)
        d.rmdir()


def break_unknown_class(folder, spec):
    data = _split_json(folder, spec)
    data["test"][3][2] = "zebra"
    _save_split_json(folder, spec, data)


def break_label_order(folder, spec):
    data = _split_json(folder, spec)
    data["train"][0][2] = "leopard"  # label 0 is 'face' in the spec; 'leopard' is label 1
    _save_split_json(folder, spec, data)


def break_undecodable(folder, spec):
    (folder / "jpg" / "c0007" / "val_0007_0.png").write_bytes(b"this is not an image")


def break_unknown_variant(folder, spec):
    with (folder / "images_variant_test.txt").open("a") as f:
        f.write("1234567 Boeing 999\n")


def break_extra_class_folder(folder, spec):
    (folder / "imagenet-a" / "README.txt").write_text("not a class: ignored")
    (folder / "imagenet-a" / "n99999999").mkdir()


def break_missing_split_file(folder, spec):
    (folder / spec.split_file).unlink()


BROKEN = {
    # id: (dataset, how to break it, number of problems, words of the messages)
    "missing-images": ("oxford_pets", break_missing_images, 1,
                       ["3 of the 111 images the split file names are missing (first: images/c0000/test_0000_0.png, "
                        "images/c0005/test_0005_0.png, images/c0009/test_0009_0.png)", "extract the original archive"]),
    "class-count-folders": ("imagenet", break_class_count_folders, 1,
                            ["images/train: 999 class folders, the dataset has 1000: missing n01440764 (tench)"]),
    "class-count-split-file": ("dtd", break_class_count_split_file, 1,
                               ["split_zhou_DescribableTextures.json: covers 46 of the 47 classes of the dataset "
                                "spec; no image of 'zigzagged' (label 46)"]),
    "malformed-split-file": ("eurosat", break_malformed_split_file, 1,
                             ["split_zhou_EuroSAT.json: not valid JSON (", "download it again"]),
    "imagenet-val-flat": ("imagenet", break_flat_imagenet_val, 2,
                          ["images/val: 1000 images lie directly in the folder, not in class folders",
                           "sort its 50,000 images into the 1000 wnid folders", "valprep.sh",
                           "images/val: 0 class folders, the dataset has 1000"]),
    "unknown-class": ("caltech101", break_unknown_class, 1,
                      ["split_zhou_Caltech101.json: test[3] names class 'zebra', which the dataset spec does not "
                       "have (1 row names such a class: zebra)"]),
    "labels-out-of-order": ("caltech101", break_label_order, 1,
                            ["train[0] calls label 0 'leopard', the dataset spec 'face' (the spec has 'leopard' at "
                             "label 1)"]),
    "undecodable-image": ("oxford_flowers", break_undecodable, 1,
                          ["1 of 306 sampled images cannot be decoded: jpg/c0007/val_0007_0.png (cannot read image"]),
    "unknown-variant": ("fgvc_aircraft", break_unknown_variant, 1,
                        ["images_variant_test.txt: 1 line names a class the dataset spec does not have: "
                         "line 101 'Boeing 999'"]),
    "extra-class-folder": ("imagenet_a", break_extra_class_folder, 1,
                           ["imagenet-a: 1 class folder(s) the dataset's class list does not have: n99999999"]),
    "missing-split-file": ("stanford_cars", break_missing_split_file, 1,
                           ["split_zhou_StanfordCars.json: split file not found"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_data_check_on_a_broken_copy_says_what_is_wrong(case, reg, specs, fakes, tmp_path):
    name, breaker, n_problems, words = BROKEN[case]
    folder = _copy(fakes, specs[name], tmp_path)
    assert check_named(reg, name, tmp_path, sample=4).ok  # the copy is fine before it is broken
    breaker(folder, specs[name])
    report = check_named(reg, name, tmp_path, sample=1000)
    text = "\n".join(report.problems)
    for w in words:
        assert w in text, (w, report.problems)
    assert len(report.problems) == n_problems, report.problems
    assert all("\n" not in p for p in report.problems)


def test_data_check_and_validate_on_the_command_line(specs, fakes, world, tmp_path):
    folder = _copy(fakes, specs["imagenet"], tmp_path)
    break_flat_imagenet_val(folder, specs["imagenet"])
    proc = vlprompt("data", "check", "imagenet", "--root", str(tmp_path), "--sample", "4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 2 and all(line.startswith("error: imagenet: ") for line in errors), errors
    assert "lie directly in the folder" in errors[0] and "valprep.sh" in errors[0]
    assert "expected layout:" in proc.stdout and "how to obtain it:" in proc.stdout
    assert "images/val/n01440764/*.JPEG" in proc.stdout

    # `vlprompt validate` runs the cheap part: the flat val folder is caught before anything runs
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump({
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "zeroshot"}, "dataset": {"name": "imagenet", "root": str(tmp_path)},
        "protocol": {"name": "domain_generalisation", "targets": [{"name": "imagenet_a", "root": str(fakes)}]},
    }))
    proc = vlprompt("validate", str(spec))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{spec}: dataset: {folder / 'images' / 'val'}: 1000 images lie directly in the folder" in proc.stderr

    # `data check` of a run spec checks each of its datasets, a user's own folder too
    mine = tmp_path / "mine"
    _images(mine / "cat", 2)
    _images(mine / "dog", 2)
    (mine / "dog" / "1.png").write_bytes(b"garbage")
    spec.write_text(yaml.safe_dump({
        "method": {"name": "zeroshot"}, "dataset": {"name": "folder", "path": str(mine)},
        "protocol": {"name": "cross_dataset", "targets": [{"name": "imagenet_a", "root": str(fakes)}]},
    }))
    proc = vlprompt("data", "check", str(spec))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["error: folder: 1 of 4 sampled images cannot be decoded: dog/1.png (cannot read image "
                      "(not an image file, or a format Pillow cannot read)); download these files again (or run "
                      "with train.unreadable_images: skip to leave unreadable images out)"]
    assert "ok: imagenet_a" in proc.stdout and "ok: folder" not in proc.stdout


def test_data_list_and_check_on_broken_or_misplaced_data(reg, specs, fakes, tmp_path):
    folder = _copy(fakes, specs["imagenet"], tmp_path)
    break_flat_imagenet_val(folder, specs["imagenet"])
    rows = {r.name: r for r in list_datasets(reg, tmp_path)}
    assert rows["imagenet"].state.startswith(f"error: {folder / 'images' / 'val'}: 1000 images lie directly")
    assert rows["oxford_pets"].state == "not found" and rows["oxford_pets"].counts is None
    # --root given as the dataset folder itself, a common slip
    report = check_named(reg, "oxford_pets", fakes / "oxford_pets")
    assert report.problems == [f"dataset folder not found: {fakes / 'oxford_pets' / 'oxford_pets'}; --root is the "
                               f"folder that *holds* oxford_pets/, not the dataset folder itself: give --root {fakes}"]
    assert report.help[:3] == ["expected layout:", f"  {fakes / 'oxford_pets' / 'oxford_pets'}/",
                               "    split_zhou_OxfordPets.json"]


def test_a_test_only_dataset_cannot_be_trained_on(reg, fakes):
    ds = load(reg, "imagenet_a", fakes)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (0, 0, 200)
    with pytest.raises(UserError, match="'imagenet_a' has no training images.*only be a target"):
        few_shot_plan(FewShotOptions(shots=1), ProtocolContext(ds, 1, None))


# ---------------------------------------------------------- custom datasets


def _images(folder: Path, n: int, colour=(200, 10, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), colour).save(folder / f"{i}.png")


def test_folder_dataset_with_a_yaml_beside_the_images(reg, tmp_path):
    root = tmp_path / "birds"
    for d in ("n001", "n002", "n003"):
        _images(root / d, 10)
    (root / "dataset.yaml").write_text(yaml.safe_dump({
        "name": "my_birds", "classnames": {"n003": "blue jay", "n001": "robin", "n002": "great_tit"},
        "templates": ["a photo of a {}, a type of bird."], "ensemble": ["a {} bird.", "a photo of the {}."],
    }, sort_keys=False))
    entry = reg.get("dataset", "folder")
    ds = entry.load(entry.options(path=root))
    assert ds.name == "my_birds"
    assert ds.classes == ClassSet(["blue jay", "robin", "great tit"], ["a photo of a {}, a type of bird."],
                                  ["a {} bird.", "a photo of the {}."])
    assert {it.path.parent.name for it in ds.test if it.label == 0} == {"n003"}  # label order = mapping order
    assert [len([it for it in s if it.label == 1]) for s in (ds.train, ds.val, ds.test)] == [5, 2, 3]
    # the run spec's section wins over the YAML
    ds = entry.load(entry.options(path=root, templates=["{}!"]))
    assert ds.classes.templates == ["{}!"] and ds.classes.names[0] == "blue jay"

    numbered = tmp_path / "numbered"
    for d in ("0", "1"):
        _images(numbered / d, 2)
    (numbered / "dataset.yaml").write_text("classnames: {1: owl, 0: hawk}\n")  # YAML reads the keys as numbers
    ds = entry.load(entry.options(path=numbered))
    assert ds.classes.names == ["owl", "hawk"] and {it.path.parent.name for it in ds.train if it.label == 0} == {"1"}

    (root / "dataset.yaml").write_text("classnames: [robin, blue jay]\ncolour: red\n")
    with pytest.raises(UserError) as exc:
        entry.load(entry.options(path=root))
    assert exc.value.problems == [f"{root / 'dataset.yaml'}: colour: unknown key"]


def test_class_list_and_folders_that_disagree_are_one_clear_error(reg, tmp_path):
    root = tmp_path / "pets"
    for d in ("cat", "dog", "hot_dog"):
        _images(root / d, 2)
    entry = reg.get("dataset", "folder")
    ds = entry.load(entry.options(path=root, classnames=["hot dog", "dog", "cat"]))
    assert ds.classes.names == ["hot dog", "dog", "cat"]  # the given order, folders matched by name
    assert {it.path.parent.name for it in ds.train + ds.val + ds.test if it.label == 0} == {"hot_dog"}
    with pytest.raises(UserError) as exc:
        entry.load(entry.options(path=root, classnames=["cat", "dog", "emu"]))
    assert exc.value.problems == [
        f"{root}: class folder(s) not in the class list: hot_dog (the class list has 3 classes; add them to it, "
        "or remove the folders)",
        f"{root}: no folder for class(es) emu of the class list",
    ]


def test_spec_file_with_class_folders_uses_the_spec_class_names(tmp_path, monkeypatch):
    specs_dir, data = tmp_path / "specs", tmp_path / "data"
    specs_dir.mkdir()
    for d in ("apple_pie", "cat", "zebra"):
        _images(data / "food" / "imgs" / "train" / d, 2)
        _images(data / "food" / "imgs" / "test" / d, 1)
    (specs_dir / "food.yaml").write_text(
        "name: food\nlayout: class_folders\nfolder: food\nimage_dir: imgs\ntemplates: ['{}, food.']\n"
        "classnames: [zebra, apple pie, cat]\n"
    )
    monkeypatch.setenv("VLPROMPT_DATASETS_SPEC", str(specs_dir))
    reg = build_registry(*make_plugin_manager())
    ds = load(reg, "food", data)
    assert ds.classes.names == ["zebra", "apple pie", "cat"]  # not the sorted folder names
    assert sorted((it.path.parent.name, it.label) for it in ds.test) == [("apple_pie", 1), ("cat", 2), ("zebra", 0)]
    assert len(ds.train) == 6 and ds.val == []

    _images(data / "food" / "imgs" / "test" / "emu", 1)
    with pytest.raises(UserError) as exc:
        load(reg, "food", data)
    assert exc.value.problems == [
        f"{data / 'food' / 'imgs'}: class folder(s) not in the class list: emu (the class list has 3 classes; "
        "add them to it, or remove the folders)"
    ]
    entry = reg.get("dataset", "food")
    assert entry.check(entry.options(root=data)) == exc.value.problems  # `vlprompt validate` says the same


def test_csv_without_split_column_and_json_lists(reg, tmp_path):
    for c in ("a", "b"):
        _images(tmp_path / "imgs" / c, 10)
    lines = ["path,class"] + [f"imgs/{c}/{i}.png,{c}" for c in "ab" for i in range(10)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "list.yaml").write_text("classnames: [b, a]\ntemplates: ['a {} thing.']\n")
    entry = reg.get("dataset", "csv")
    ds = entry.load(entry.options(path=tmp_path / "list.csv"))
    assert ds.classes.names == ["b", "a"] and ds.classes.templates == ["a {} thing."]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 4, 6)  # 50/20/30 per class, seeded
    assert all(it.path.parent.name == "ab"[1 - it.label] for it in ds.train + ds.val + ds.test)

    rows = [{"path": f"imgs/a/{i}.png", "class": "a", "split": "train" if i < 6 else "test"} for i in range(10)]
    rows += [{"path": f"imgs/b/{i}.png", "class": "b"} for i in range(10)]
    (tmp_path / "mine.json").write_text(json.dumps(rows))
    entry = reg.get("dataset", "json")
    ds = entry.load(entry.options(path=tmp_path / "mine.json"))
    assert ds.classes.names == ["a", "b"] and ds.name == "mine"
    counts = [Counter(it.label for it in s) for s in (ds.train, ds.val, ds.test)]
    assert counts == [{0: 6, 1: 5}, {1: 2}, {0: 4, 1: 3}]  # a: as listed; b: no split given, 50/20/30

    split = {"train": [["imgs/a/0.png", 0, "a"], ["imgs/b/0.png", 1, "b_b"]], "val": [],
             "test": [["imgs/a/1.png", 0, "a"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    ds = entry.load(entry.options(path=tmp_path / "split.json"))
    assert ds.classes.names == ["a", "b b"] and len(ds.train) == 2 and ds.test == [Item(tmp_path / "imgs/a/1.png", 0)]

    (tmp_path / "bad.csv").write_text("path,class\nimgs/a/0.png,a\nimgs/a/1.png,zebra\n")
    (tmp_path / "bad.yaml").write_text("classnames: [a, b]\n")
    with pytest.raises(UserError, match=r"bad.csv: class\(es\) not in the class list: zebra"):
        reg.get("dataset", "csv").load(reg.get("dataset", "csv").options(path=tmp_path / "bad.csv"))


# ------------------------------------------ transfer and DG from a fake ImageNet


def _run_spec(world, output, dataset, protocol, method, **train):
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method, "dataset": dataset, "protocol": protocol,
        "train": {"epochs": 1, "batch_size": 512, "seeds": [1], **train}, "output": str(output),
    }


@pytest.mark.slow  # whole runs on fake ImageNet and its variants
def test_cross_dataset_and_domain_generalisation_from_a_fake_imagenet(world, fakes, tmp_path):
    custom = tmp_path / "my_shapes"
    for i, c in enumerate(("circle", "square", "star")):
        _images(custom / c, 4, colour=(40 * i, 90, 200))
    root = str(fakes)
    xd = tmp_path / "xd.yaml"
    xd.write_text(yaml.safe_dump(_run_spec(
        world, tmp_path / "xd", {"name": "imagenet", "root": root},
        {"name": "cross_dataset", "shots": 1, "targets": [
            {"name": "oxford_pets", "root": root}, {"name": "fgvc_aircraft", "root": root},
            {"name": "folder", "path": str(custom)}]},
        [{"name": "zeroshot"}, {"name": "coop", "n_ctx": 2}])))
    proc = vlprompt("run", str(xd))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "xd" / "results.json").read_text())
    for label in ("zeroshot", "coop"):
        summary = results["summary"][label]
        assert list(summary) == ["imagenet (source)", "oxford_pets", "fgvc_aircraft", "my_shapes", "average"]
        assert all(0 <= summary[k]["mean"] <= 100 for k in summary)
    (coop,) = [r for r in results["runs"] if r["method"] == "coop"]
    assert (tmp_path / "xd" / coop["checkpoint"]).is_file()
    assert results["unreadable_images"] == {"count": 0, "examples": []}

    # DG: the same ImageNet-trained prompts scored on the fake ImageNet-A (its 200 classes) and -V2
    dg = tmp_path / "dg.yaml"
    dg.write_text(yaml.safe_dump(_run_spec(
        world, tmp_path / "dg", {"name": "imagenet", "root": root},
        {"name": "domain_generalisation", "shots": 1, "targets": [
            {"name": "imagenet_a", "root": root}, {"name": "imagenet_v2", "root": root},
            {"name": "folder", "path": str(custom)}]},
        [{"name": "zeroshot"}, {"name": "coop", "n_ctx": 2}])))
    proc = vlprompt("eval", str(dg), "--from", str(tmp_path / "xd"))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "dg" / "results.json").read_text())
    assert list(results["summary"]["coop"]) == ["imagenet (source)", "imagenet_a", "imagenet_v2", "my_shapes",
                                                "average"]
    (scored,) = [r for r in results["runs"] if r["method"] == "coop"]
    assert scored["checkpoint_from"] == str(tmp_path / "xd" / coop["checkpoint"])


class Oracle(PromptMethod):
    """Knows every class by name: an image's colour is ``class_colour`` of its class
    name, so it scores 100% exactly when each image's label names its class."""

    inputs = ("images",)

    def __init__(self, backbone, classes, options):
        super().__init__(backbone, classes, options)
        self.set_classes(classes)

    def set_classes(self, classes):
        self.codes = torch.tensor([class_colour(n) for n in classes.names], dtype=torch.float32)

    def forward(self, batch):
        mean = torch.tensor(self.backbone.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone.image_std).view(1, 3, 1, 1)
        colour = ((batch.images.float() * std + mean) * 255).mean((2, 3))
        return MethodOutput(-torch.cdist(colour, self.codes))


class OraclePlugin:
    @hookimpl
    def vlprompt_methods(self):
        return [MethodEntry("oracle", Options, Oracle, "test: knows every class by name")]


def test_domain_generalisation_scores_imagenet_a_and_r_on_their_200_classes(world, fakes, specs, tmp_path):
    reg = build_registry(*make_plugin_manager(extra=(("oracle", OraclePlugin()),)))
    root = str(fakes)
    targets = [{"name": n, "root": root} for n in ("imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch")]
    spec = validate_spec(_run_spec(world, tmp_path / "out", {"name": "imagenet", "root": root},
                                   {"name": "domain_generalisation", "shots": 1, "targets": targets},
                                   {"name": "oracle"}, precision="fp32", device="cpu"), reg)
    record = Engine(spec, reg).run()
    acc = record["runs"][0]["accuracy"]
    # CLIP's ImageNet names repeat two (missile, sunglasses): of each pair, the second class's image is
    # taken for the first, 998 of 1000 right; A and R (200 classes each) have no repeated names.
    assert acc == {"imagenet": 99.8, "imagenet_a": 100.0, "imagenet_r": 100.0, "imagenet_v2": 99.8,
                   "imagenet_sketch": 99.8}
    # and each ImageNet-A image is labelled with its wnid's class among the 200
    a = load(reg, "imagenet_a", fakes)
    inet = specs["imagenet"]
    for it in a.test:
        wnid = it.path.parent.name
        assert a.classes.names[it.label] == inet.classnames[inet.class_dirs.index(wnid)]


# --------------------------------------------------------- unreadable images


def test_image_loader_reports_or_skips_unreadable_images_from_worker_processes(tmp_path):
    _images(tmp_path / "ok", 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    items = [Item(tmp_path / "ok" / f"{i}.png", i) for i in range(3)]
    items += [Item(tmp_path / "broken.png", 7), Item(tmp_path / "gone.png", 8)]
    tf = make_test_transform(16, (0.0,) * 3, (1.0,) * 3)

    loader = ImageLoader(items, tf, batch_size=2, num_workers=1, on_unreadable="skip")
    batches = [(x.shape[0], y.tolist()) for x, y in loader]
    assert batches == [(2, [0, 1]), (1, [2])]  # the batch of the two unreadable images is dropped
    assert loader.unreadable.summary() == {"count": 2, "examples": [
        {"path": str(tmp_path / "broken.png"), "reason": loader.unreadable.reasons[str(tmp_path / "broken.png")]},
        {"path": str(tmp_path / "gone.png"), "reason": "image file not found"}]}
    assert loader.unreadable.reasons[str(tmp_path / "broken.png")].startswith("cannot read image (")

    with pytest.raises(UserError) as exc:
        list(ImageLoader(items, tf, batch_size=2, num_workers=1))
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith(f"{tmp_path / 'broken.png'}: cannot read image (")
    assert "unreadable_images: skip" in exc.value.problems[0] and "Traceback" not in exc.value.problems[0]


def test_a_run_with_an_unreadable_image_stops_with_its_path(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world["data"] / "toy", data / "toy")
    broken = data / "toy" / "images" / "red_test_0.png"
    broken.write_bytes(b"\x89PNG truncated")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_run_spec(world, tmp_path / "out", {"name": "toy", "root": str(data)},
                                             {"name": "few_shot", "shots": 2}, {"name": "zeroshot"}, num_workers=1)))
    # in a process of its own: what its data-loading worker process prints is on its stderr too
    proc = vlprompt_process("run", str(spec), env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "worker" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error")]
    assert line.startswith(f"error: {broken}: cannot read image (") and "unreadable_images: skip" in line


def test_a_run_may_skip_unreadable_images_and_counts_them(world, fakes, specs, tmp_path):
    folder = _copy(fakes, specs["eurosat"], tmp_path)
    broken = folder / "2750" / "c0003" / "test_0003_0.png"
    broken.write_bytes(b"not an image")
    (folder / "2750" / "c0004" / "test_0004_0.png").unlink()
    reg = build_registry(*make_plugin_manager(extra=(("oracle", OraclePlugin()),)))
    spec = validate_spec(_run_spec(world, tmp_path / "out", {"name": "eurosat", "root": str(tmp_path)},
                                   {"name": "few_shot", "shots": 1}, {"name": "oracle"}, precision="fp32",
                                   device="cpu", unreadable_images="skip", num_workers=1), reg)
    record = Engine(spec, reg).run()
    assert record["runs"][0]["accuracy"] == {"test": 100.0}  # 8 of 8 readable test images, none counted wrong
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["unreadable_images"]["count"] == 2
    assert [e["path"] for e in saved["unreadable_images"]["examples"]] == [
        str(broken), str(folder / "2750" / "c0004" / "test_0004_0.png")]
    assert saved["unreadable_images"]["examples"][1]["reason"] == "image file not found"
