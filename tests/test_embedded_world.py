"""Tests of the embedded world, its tasks, specs and the shipped tiny CLIP."""

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"

from vlprompt_core.embedded import tasks, world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "vlprompt_core" / "embedded"

# Floor for the shipped checkpoint's zero-shot accuracy over all classes of
# "objects" (measured value: pretrain_log.json, zero_shot.accuracy.all).
ZERO_SHOT_MIN_ALL = 0.2


def test_sample_is_deterministic_in_seed():
    images_a, captions_a, scenes_a = world.sample(32, seed=7)
    images_b, captions_b, scenes_b = world.sample(32, seed=7)
    assert images_a.shape == (32, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert images_a.dtype == np.uint8
    np.testing.assert_array_equal(images_a, images_b)
    assert captions_a == captions_b and scenes_a == scenes_b

    images_c, captions_c, _ = world.sample(32, seed=8)
    assert not np.array_equal(images_a, images_c)
    assert captions_a != captions_c


def test_sample_does_not_touch_global_rng():
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    world.sample(4, seed=1)
    assert np.random.random() == expected


def test_attributes_are_independent_and_cover_all_values():
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng) for _ in range(8000)]
    for name, values in world.ATTRIBUTES.items():
        assert {getattr(s, name) for s in scenes} == set(values), name
    # Joint colour x shape frequencies match the product of the marginals.
    colour = Counter(s.colour for s in scenes)
    shape = Counter(s.shape for s in scenes)
    joint = Counter((s.colour, s.shape) for s in scenes)
    n = len(scenes)
    for c in colour:
        for s in shape:
            expected = colour[c] * shape[s] / n
            assert abs(joint[c, s] - expected) < 5 * math.sqrt(expected), (c, s)
    # Lighting is independent of colour too (it is skewed, not correlated).
    for c in colour:
        warm = sum(1 for s in scenes if s.colour == c and s.lighting == "warm") / colour[c]
        assert 0.05 < warm < 0.15, c


def test_sample_scene_respects_constraints():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = world.sample_scene(rng, colour="red", texture=("plain", "striped"))
        assert scene.colour == "red" and scene.texture in ("plain", "striped")
    with pytest.raises(ValueError):
        world.sample_scene(rng, flavour="sweet")


def test_captions_only_name_the_true_colour_and_shape():
    _, captions, scenes = world.sample(500, seed=3)
    mentioned_colour = 0
    for text, scene in zip(captions, scenes):
        words = set(text.replace(",", " ").replace(".", " ").split())
        assert words & set(world.COLOURS) <= {scene.colour}, text
        assert words & set(world.SHAPES) <= {scene.shape}, text
        mentioned_colour += scene.colour in words
    assert 0.7 < mentioned_colour / len(scenes) < 0.95
    assert len(set(captions)) > 400


def test_rendering_shows_the_colour():
    # The object's pixels are dominated by its colour's strongest channel.
    rng = np.random.default_rng(0)
    for colour, channel in (("red", 0), ("green", 1), ("blue", 2)):
        scene = world.Scene("square", colour, "large", "plain", "light", "centre", "neutral")
        centre = world.render(scene, rng)[12:20, 12:20].reshape(-1, 3).mean(0)
        assert centre.argmax() == channel, colour


def test_classnames_split_base_and_novel_evenly():
    names = tasks.classnames("objects")
    assert len(names) >= 20 and len(set(names)) == len(names)
    assert tasks.classnames("objects_shifted") == names
    assert tasks.classnames("objects_closeup") == names
    n_base = math.ceil(len(names) / 2)
    for half in (names[:n_base], names[n_base:]):
        assert {n.split()[0] for n in half} == set(tasks.TASK_COLOURS)
        assert {n.split()[1] for n in half} == set(tasks.TASK_SHAPES)
    with pytest.raises(ValueError):
        tasks.classnames("nope")


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_write_task_writes_a_valid_split_file(task, tmp_path):
    dest = tmp_path / "data" / task
    tasks.write_task(task, dest, seed=0)
    assert sorted(p.name for p in dest.parent.iterdir()) == [task]  # no temp leftovers
    split = json.loads((dest / "split.json").read_text())
    names = tasks.classnames(task)
    assert set(split) == {"train", "val", "test"}
    for name, entries in split.items():
        assert len(entries) == tasks.TASKS[task].per_class[name] * len(names)
        assert {label for _, label, _ in entries} == set(range(len(names)))
        for rel, label, classname in entries:
            assert classname == names[label]
            assert (dest / "images" / rel).is_file()
    first = split["test"][0][0]
    with open(dest / "images" / first, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        tasks.write_task(task, dest)


def test_task_generation_is_deterministic():
    a, la = tasks.generate("objects", "val", seed=0)
    b, lb = tasks.generate("objects", "val", seed=0)
    c, _ = tasks.generate("objects", "val", seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)


# SHA-256 (first 16 hex digits) of generate(task, "val", seed=0): images, then labels.
# The shipped numbers of these tasks (README, pretrain_log.json) depend on every byte.
EXISTING_TASK_DIGESTS = {"objects": "5423cfefe9e713b9", "objects_shifted": "cd1f3206c93177d9"}


@pytest.mark.parametrize("task", sorted(EXISTING_TASK_DIGESTS))
def test_existing_tasks_render_the_same_images(task):
    images, labels = tasks.generate(task, "val", seed=0)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    assert digest == EXISTING_TASK_DIGESTS[task]


def test_novel_fixed_overrides_the_novel_half_only(monkeypatch):
    calls = []
    sample = world.sample

    def recording(n, rng, **fixed):
        calls.append(fixed)
        return sample(n, rng, **fixed)

    monkeypatch.setattr(tasks.world, "sample", recording)
    _, labels = tasks.generate("objects_closeup", "val", seed=0)
    n_base = math.ceil(len(tasks.classnames("objects_closeup")) / 2)
    assert [c["size"] for c in calls] == ["large"] * n_base + ["small"] * (len(calls) - n_base)
    assert all(c["lighting"] == "cool" for c in calls)  # the rest of `fixed` is shared
    assert len(labels) == len(calls) * tasks.TASKS["objects_closeup"].per_class["val"]


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_spec_matches_task(task):
    spec = yaml.safe_load((ROOT / "datasets_spec" / f"embedded_{task}.yaml").read_text())
    assert spec["name"] == spec["folder"] == f"embedded_{task}"
    assert spec["layout"] == "split_file"
    assert spec["embedded"] == task
    assert spec["image_dir"] == "images" and spec["split_file"] == "split.json"
    assert spec["templates"][0] == "a photo of a {}."
    assert spec["classnames"] == tasks.classnames(task)


@pytest.fixture(scope="module")
def tiny_clip():
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from vlprompt_core.embedded import pretrain

    pretrain.register_config()
    weights = pretrain.weights_path()
    model = open_clip.create_model(pretrain.MODEL_NAME, pretrained=str(weights)).eval()
    return model, open_clip.get_tokenizer(pretrain.MODEL_NAME)


def test_shipped_checkpoint_loads_with_expected_shapes(tiny_clip):
    model, tokenizer = tiny_clip
    config = json.loads((EMBEDDED / "vlprompt_tiny.json").read_text())
    text_cfg = config["text_cfg"]
    assert type(model).__name__ == "CLIP"
    assert model.token_embedding.weight.shape == (49408, text_cfg["width"])
    assert model.positional_embedding.shape == (text_cfg["context_length"], text_cfg["width"])
    assert model.text_projection.shape == (text_cfg["width"], config["embed_dim"])
    assert model.visual.image_size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert tokenizer.context_length == text_cfg["context_length"] >= 32
    assert (EMBEDDED / "vlprompt_tiny.safetensors").stat().st_size < 15e6


def test_shipped_checkpoint_zero_shot_is_well_above_chance(tiny_clip):
    import torch

    from vlprompt_core.embedded import pretrain

    model, tokenizer = tiny_clip
    images, labels = tasks.generate("objects", "test", seed=0)
    keep = np.arange(0, len(labels), len(labels) // 200)[:200]
    names = tasks.classnames("objects")
    with torch.no_grad():
        img = model.encode_image(pretrain.to_tensor(images[keep]), normalize=True)
        txt = model.encode_text(tokenizer([f"a photo of a {c}." for c in names]), normalize=True)
    accuracy = ((img @ txt.T).argmax(1).numpy() == labels[keep]).mean()
    chance = 1 / len(names)
    assert accuracy > ZERO_SHOT_MIN_ALL > 3 * chance



def _zero_shot_by_half(model, tokenizer, task, template, per_class=6):
    """Zero-shot accuracy of ``template`` on base and novel test images, each half under
    its own classifier (as base2novel scores them), on ``per_class`` images per class."""
    import torch

    from vlprompt_core.embedded import pretrain

    images, labels = tasks.generate(task, "test", seed=0)
    names = tasks.classnames(task)
    n_base = math.ceil(len(names) / 2)
    keep = np.flatnonzero(np.arange(len(labels)) % tasks.TASKS[task].per_class["test"] < per_class)
    with torch.no_grad():
        img = model.encode_image(pretrain.to_tensor(images[keep]), normalize=True)
        txt = model.encode_text(tokenizer([template.format(c) for c in names]), normalize=True)
    labels = torch.as_tensor(labels[keep])
    result = {}
    for half, lo, hi in (("base", 0, n_base), ("novel", n_base, len(names))):
        rows = (labels >= lo) & (labels < hi)
        pred = (img[rows] @ txt[lo:hi].T).argmax(1) + lo
        result[half] = (pred == labels[rows]).float().mean().item()
    return result, (1 / n_base, 1 / (len(names) - n_base))


def test_closeup_zero_shot_is_well_above_chance_on_both_halves(tiny_clip):
    model, tokenizer = tiny_clip
    accuracy, chance = _zero_shot_by_half(model, tokenizer, "objects_closeup", "a photo of a {}.")
    assert accuracy["base"] > 5 * chance[0] and accuracy["novel"] > 5 * chance[1]


def test_closeup_saying_close_up_helps_base_and_hurts_novel_classes(tiny_clip):
    # The task's defining property, without training: what the base images share (large
    # objects) is something a prompt can say, and saying it costs the novel (small) ones.
    model, tokenizer = tiny_clip
    plain, _ = _zero_shot_by_half(model, tokenizer, "objects_closeup", "a photo of a {}.")
    large, _ = _zero_shot_by_half(model, tokenizer, "objects_closeup", "a large {}.")
    assert large["base"] >= plain["base"] + 0.05
    assert large["novel"] <= plain["novel"] - 0.15


def _materialise(barrier, folder: Path, flock: bool, report: Path) -> None:
    """One of the two processes of the test below: materialise ``objects`` in ``folder``
    and write how many times this process generated it to ``report``.

    The barrier holds both processes after their first look at the (empty) root, so both
    go on to make the task. ``flock=False`` is the path of a system without ``flock``:
    both generate, and the barrier holds them again after writing, so both rename their
    finished task at once and one of them must lose."""
    import contextlib

    from vlprompt_core.builtin import spec_datasets as sd

    looked, generated = [], []
    real_ready, real_write = sd.embedded_ready, tasks.write_task

    def ready(task, where):
        answer = real_ready(task, where)
        if not looked:
            looked.append(answer)
            barrier.wait()
        return answer

    def write(task, dest, seed=0):
        real_write(task, dest, seed)
        generated.append(task)
        if not flock:
            barrier.wait()

    sd.embedded_ready, tasks.write_task = ready, write
    if not flock:
        sd._turn = lambda path: contextlib.nullcontext()
    sd.ensure_embedded("objects", folder)
    assert looked == [False]
    report.write_text(json.dumps(len(generated)))


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no-flock"])
def test_two_processes_materialise_one_embedded_task_at_once(tmp_path, flock):
    # As a sweep's --jobs or parallel test workers do on an empty data root: both processes
    # succeed and use one complete task (before: the second's rename failed, or it removed
    # the folder the first was writing).
    import multiprocessing
    from multiprocessing.connection import wait

    from vlprompt_core.builtin.spec_datasets import embedded_ready

    # forked from a fresh server process that has imported the module (no import per
    # process, nothing inherited from this process's threads)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["vlprompt_core.builtin.spec_datasets"])
    barrier = ctx.Barrier(2)
    folder = tmp_path / "data" / "embedded_objects"
    reports = [tmp_path / f"process{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_materialise, args=(barrier, folder, flock, r)) for r in reports]
    for p in procs:
        p.start()
    running = list(procs)
    while running:  # a process that fails breaks the barrier, so the other one cannot wait forever
        for sentinel in wait([p.sentinel for p in running]):
            p = next(p for p in running if p.sentinel == sentinel)
            p.join()
            running.remove(p)
            if p.exitcode != 0:
                barrier.abort()
    assert [p.exitcode for p in procs] == [0, 0]
    generated = [json.loads(r.read_text()) for r in reports]
    assert sorted(generated) == ([0, 1] if flock else [1, 1])  # with flock, the second waits and uses the first's
    assert embedded_ready("objects", folder)
    split = json.loads((folder / "split.json").read_text())
    names = tasks.classnames("objects")
    for name, entries in split.items():
        assert len(entries) == tasks.TASKS["objects"].per_class[name] * len(names)
        assert all((folder / "images" / rel).is_file() for rel, _, _ in entries)
    assert sum(1 for _ in (folder / "images").rglob("*.png")) == sum(len(e) for e in split.values())
    left = {p.name for p in folder.parent.iterdir()}
    assert left == {"embedded_objects", *([".embedded_objects.lock"] if flock else [])}  # no temporary folders
