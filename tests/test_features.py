"""Frozen image features: the on-disk cache (``train.feature_cache``), augmented
views (``train.augment_views``) shared across methods and seeds, and textbook mode
giving what the engine gives."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from test_method_hooks import spying
from vlprompt_core.api import Batch, ClassSet, MethodOutput, PromptMethod
from vlprompt_core.engine import Engine, ViewBatches, forward
from vlprompt_core.errors import UserError
from vlprompt_core.features import Features, FeatureStore, weights_hash
from vlprompt_core.plugins import Registry
from vlprompt_core.spec import check_spec, resolve_methods, validate_spec
from vlprompt_core.textbook import active, textbook


@pytest.fixture(scope="module")
def reg(toy_registry):
    return toy_registry


def counting(reg: Registry) -> tuple[Registry, dict]:
    """``reg`` whose backbone records every batch of images it encodes (``store["encodes"]``)."""
    store = {"encodes": [], "methods": []}
    return spying(reg, store), store


def encoded(store: dict) -> int:
    """How many images the backbone encoded."""
    return sum(len(images) for images in store["encodes"])


def make_engine(world, reg, output, method=None, protocol=None, log=None, **train) -> Engine:
    data = {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method or {"name": "coop", "n_ctx": 4},
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": protocol or {"name": "few_shot", "shots": 2},
        "train": {"epochs": 2, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32", **train},
        "output": str(output),
    }
    spec = validate_spec(data, reg)
    check_spec(spec, reg)
    return Engine(spec, reg, log=log or (lambda line: None))


def accuracies(record) -> dict:
    return {(r["method"], r["seed"]): r["accuracy"] for r in record["runs"]}


# ------------------------------------------------------------ the disk cache


def test_second_run_reads_test_features_from_disk_and_scores_the_same(world, reg, tmp_path):
    cache = tmp_path / "cache"
    spy, store = counting(reg)
    first = make_engine(world, spy, tmp_path / "a", epochs=0, feature_cache=str(cache))
    rec1 = first.run()
    assert first.features.events == [("features: test", "computed")]
    n_first = encoded(store)
    assert n_first == 6 * 3  # the toy test split: 6 classes x 3 images

    spy, store = counting(reg)
    second = make_engine(world, spy, tmp_path / "b", epochs=0, feature_cache=str(cache))
    rec2 = second.run()
    assert second.features.events == [("features: test", "disk")]
    assert encoded(store) == 0  # not one test image encoded again
    assert accuracies(rec1) == accuracies(rec2)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].endswith(".safetensors")  # no temporary file left behind


def test_cache_misses_when_an_image_precision_or_backbone_changes(world, reg, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    make_engine(world, reg, tmp_path / "a", epochs=0, feature_cache=str(cache)).run()
    again = make_engine(world, reg, tmp_path / "b", epochs=0, feature_cache=str(cache), precision="bf16")
    again.run()
    assert again.features.events == [("features: test", "computed")]  # another precision, another entry

    # a test image rewritten in place (same path) is a different item
    test_image = again.load_dataset(again.spec.dataset).test[0].path
    stat = os.stat(test_image)
    try:
        os.utime(test_image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        changed = make_engine(world, reg, tmp_path / "c", epochs=0, feature_cache=str(cache))
        changed.run()
        assert changed.features.events == [("features: test", "computed")]
    finally:
        os.utime(test_image, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    # other backbone weights (another seed initialises the random model differently)
    other = make_engine(world, reg, tmp_path / "d", epochs=0, feature_cache=str(cache), seeds=[2])
    other.run()
    assert other.features.events == [("features: test", "computed")]
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_a_corrupt_cache_file_is_computed_again_and_replaced(world, reg, tmp_path):
    cache = tmp_path / "cache"
    rec = make_engine(world, reg, tmp_path / "a", epochs=0, feature_cache=str(cache)).run()
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # cut short, as by a full disk
    (cache / f".{path.stem}.123.tmp").write_bytes(b"half a file")  # a writer killed mid-way
    lines: list[str] = []
    engine = make_engine(world, reg, tmp_path / "b", epochs=0, feature_cache=str(cache), log=lines.append)
    assert accuracies(engine.run()) == accuracies(rec)
    assert engine.features.events == [("features: test", "computed")]
    assert any("unreadable feature cache" in line for line in lines)
    again = make_engine(world, reg, tmp_path / "c", epochs=0, feature_cache=str(cache))
    again.run()
    assert again.features.events == [("features: test", "disk")]


def test_concurrent_writers_of_one_entry_leave_one_whole_file(tmp_path):
    store = FeatureStore(tmp_path)
    found = Features(torch.randn(50, 8), torch.arange(50))
    threads = [threading.Thread(target=store._save, args=("k", "test", found)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]
    loaded = store._load("k")
    assert torch.equal(loaded.features, found.features) and torch.equal(loaded.labels, found.labels)


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    import vlprompt_core.features as features

    def interrupted(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        FeatureStore(tmp_path)._save("k", "test", Features(torch.zeros(2, 2), torch.zeros(2)))
    assert list(tmp_path.iterdir()) == []


def test_weights_hash_sees_one_changed_weight(tiny_backbone):
    before = weights_hash(tiny_backbone)
    assert weights_hash(tiny_backbone) == before
    with torch.no_grad():
        p = next(tiny_backbone.visual.parameters())
        p.view(-1)[0] += 1e-6
    assert weights_hash(tiny_backbone) != before


def test_feature_cache_and_text_chunk_do_not_change_the_results_key(world, reg, tmp_path):
    def key(**train):
        spec = make_engine(world, reg, tmp_path, **train).spec
        return resolve_methods(spec, reg)[0].key

    plain = key()
    assert key(feature_cache=str(tmp_path / "c")) == plain
    assert key(text_chunk=3) == plain
    assert key(augment_views=0) == plain  # results keyed before the option existed stay valid
    assert key(augment_views=4) != plain


@pytest.mark.parametrize("bad", [-1, "some", 1.5])
def test_text_chunk_must_be_a_count_or_auto(world, reg, tmp_path, bad):
    with pytest.raises(UserError, match="text_chunk"):
        make_engine(world, reg, tmp_path, text_chunk=bad)


# ------------------------------------------------------------ augmented views


def test_view_batches_visit_every_image_once_per_epoch_with_random_views():
    k_views, n = 3, 10
    feats = torch.stack([torch.stack([torch.tensor([float(k), float(i)]) for i in range(n)]) for k in range(k_views)])
    views = Features(feats, torch.arange(n))
    batches = ViewBatches(views, 4, seed=7, device=torch.device("cpu"))
    assert len(batches) == 2  # 10 images, batch 4: the last partial batch is dropped, as the image loader does
    seen_views, orders = set(), []
    for _ in range(5):
        epoch = list(batches)
        items = torch.cat([b.image_features[:, 1] for b in epoch]).long()
        labels = torch.cat([b.labels for b in epoch])
        assert torch.equal(items, labels)  # each feature row comes with its own label
        assert len(set(items.tolist())) == 8  # no image twice in an epoch
        seen_views |= set(torch.cat([b.image_features[:, 0] for b in epoch]).long().tolist())
        orders.append(items.tolist())
    assert seen_views == {0, 1, 2}
    assert len({tuple(o) for o in orders}) > 1  # a fresh order every epoch
    again = ViewBatches(views, 4, seed=7, device=torch.device("cpu"))
    assert torch.equal(next(iter(again)).image_features, next(iter(ViewBatches(views, 4, 7, torch.device("cpu")))).image_features)
    assert len(ViewBatches(Features(feats[:, :3], torch.arange(3)), 4, 0, torch.device("cpu"))) == 1  # fewer than a batch


def test_views_are_extracted_once_for_every_method_of_a_seed(world, reg, tmp_path):
    spy, store = counting(reg)
    methods = [{"name": "coop", "n_ctx": 4, "label": "a"}, {"name": "coop", "n_ctx": 2, "label": "b"}]
    engine = make_engine(world, spy, tmp_path / "o", method=methods, augment_views=3,
                         epochs=3, seeds=[1, 2])
    record = engine.run()
    views = [source for kind, source in engine.features.events if kind == "train views"]
    # seed 1: built for a, shared with b; seed 2 draws other shots: built again, shared again
    assert views == ["computed", "memory", "computed", "memory"]
    n_train = 6 * 2  # 6 classes x 2 shots
    n_test = 6 * 3
    assert encoded(store) == 2 * 3 * n_train + n_test  # 2 seeds x 3 views; test features once for the run
    for r in record["runs"]:
        assert len(r["epochs"]) == 3 and all(e["time_s"] >= 0 for e in r["epochs"])


def test_seeds_with_the_same_images_share_one_set_of_views(world, reg, tmp_path):
    engine = make_engine(world, reg, tmp_path / "o", augment_views=2, epochs=1, seeds=[1, 2],
                         protocol={"name": "few_shot", "shots": 100})  # shots beyond the split: every image
    engine.run()
    views = [source for kind, source in engine.features.events if kind == "train views"]
    assert views == ["computed", "memory"]


def test_training_on_views_is_reproducible_and_differs_from_exact_training(world, reg, tmp_path):
    runs = [make_engine(world, reg, tmp_path / name, augment_views=2, epochs=3).run() for name in ("a", "b")]
    exact = make_engine(world, reg, tmp_path / "c", epochs=3).run()
    assert runs[0]["runs"][0]["epochs"][-1]["loss"] == runs[1]["runs"][0]["epochs"][-1]["loss"]
    assert runs[0]["runs"][0]["epochs"][-1]["loss"] != exact["runs"][0]["epochs"][-1]["loss"]
    assert runs[0]["methods"]["coop"]["train"]["augment_views"] == 2


def test_views_are_cached_on_disk_too(world, reg, tmp_path):
    cache = str(tmp_path / "cache")
    first = make_engine(world, reg, tmp_path / "a", augment_views=2, epochs=1, feature_cache=cache)
    rec = first.run()
    second = make_engine(world, reg, tmp_path / "b", augment_views=2, epochs=1, feature_cache=cache)
    assert accuracies(second.run()) == accuracies(rec)
    assert ("train views", "disk") in second.features.events


def test_a_method_that_reads_images_trains_exactly_and_says_so(world, reg, tmp_path):
    lines: list[str] = []
    engine = make_engine(world, reg, tmp_path / "o", method={"name": "toy_visual"}, augment_views=2, epochs=1,
                         log=lines.append)
    engine.run()
    assert not [e for e in engine.features.events if e[0] == "train views"]
    assert any("augment_views applies to methods that read only frozen image features" in line for line in lines)


# ------------------------------------------------------------ textbook mode


def test_textbook_mode_is_scoped():
    assert not active()
    with textbook():
        assert active()
        with textbook(False):
            assert not active()
        assert active()
    assert not active()


def test_textbook_mode_scores_what_the_engine_scores(world, reg, tmp_path):
    methods = [{"name": "coop", "n_ctx": 4}, {"name": "zeroshot"}]
    spy, store = counting(reg)
    engine_run = make_engine(world, spy, tmp_path / "a", method=methods).run()
    n_engine = encoded(store)
    spy, store = counting(reg)
    with textbook():
        textbook_run = make_engine(world, spy, tmp_path / "b", method=methods).run()
    n_textbook = encoded(store)
    for key, acc in accuracies(engine_run).items():
        for split, value in acc.items():
            assert accuracies(textbook_run)[key][split] == pytest.approx(value, abs=1e-9)
    # the engine encodes the test split once for the run; textbook mode once per method
    n_train = 2 * 6 * 2  # CoOp: 2 epochs x 12 images
    assert n_engine == n_train + 18
    assert n_textbook == n_train + 2 * 18


class PerImage(PromptMethod):
    """Scores that depend on each image's own feature, plus an extra loss term."""

    inputs = ("image_features",)
    per_image_text = True

    def __init__(self, backbone, classes, options=None):
        super().__init__(backbone, classes, options)
        self.w = torch.nn.Parameter(torch.randn(len(classes), backbone.embed_dim))
        self.calls: list[int] = []

    def set_classes(self, classes):
        pass

    def forward(self, batch):
        self.calls.append(len(batch))
        f = batch.image_features
        logits = (f[:, None, :] * self.w[None] * f.norm(dim=-1)[:, None, None]).sum(-1)
        return MethodOutput(logits, {"reg": (f.sum(-1) ** 2).mean()})


def test_textbook_mode_calls_per_image_methods_one_image_at_a_time(tiny_backbone):
    m = PerImage(tiny_backbone, ClassSet(["a", "b", "c"]))
    batch = Batch(image_features=torch.randn(5, tiny_backbone.embed_dim), labels=torch.tensor([0, 1, 2, 0, 1]))
    together = forward(m, batch)
    with textbook():
        looped = forward(m, batch)
    assert m.calls == [5, 1, 1, 1, 1, 1]
    torch.testing.assert_close(looped.logits, together.logits)
    torch.testing.assert_close(looped.losses["reg"], together.losses["reg"])


def test_cached_recomputes_in_textbook_mode(tiny_backbone):
    m = PerImage(tiny_backbone, ClassSet(["a"]))
    m.eval()
    calls = []
    for _ in range(2):
        m.cached("k", lambda: calls.append(1) or torch.zeros(1))
    assert len(calls) == 1
    with textbook():
        for _ in range(2):
            m.cached("k", lambda: calls.append(1) or torch.zeros(1))
    assert len(calls) == 3
