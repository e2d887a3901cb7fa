"""Methods fitted from frozen features (``before_training`` / ``after_training``, fitted
tensors): what the engine hands them (the training and validation splits, never a test
split), when it calls them, and that their fitted state is checkpointed, restored and
scored again exactly. A toy prototype classifier stands in for Tip-Adapter and the
linear probe; it passes the contract suite."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import ClassSet, FrozenData, MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.data import test_transform as centre_crop
from vlprompt_core.data.images import read_rgb
from vlprompt_core.errors import UserError
from vlprompt_core.testing import Case, MethodContract, make_world, synthetic_frozen_data

SEEN: list[dict] = []  # what each fit saw (the engine tests read it)


class ProtoOptions(Options):
    views: int = Field(2, ge=0)
    trainable_scale: bool = False


class Prototypes(PromptMethod):
    """Class means of the training features (from ``views`` augmented views, or the
    centre crop with 0), scaled by a temperature searched on the validation split;
    optionally a trainable scale on top (gradient steps after the fit)."""

    def __init__(self, backbone, classes, options):
        super().__init__(backbone, classes, options)
        self.register_fitted("means", torch.empty(0))
        self.register_fitted("temperature", torch.tensor(1.0))
        if options.trainable_scale:
            self.scale = nn.Parameter(torch.ones(()))
        self.n_classes = len(classes)

    @classmethod
    def fixed_classes(cls, options):
        return "prototypes score only the classes they were fitted on"

    def set_classes(self, classes):
        if self.means.numel() and len(classes) != self.means.shape[0]:
            raise UserError(self.fixed_classes(self.options))
        self.n_classes = len(classes)

    def before_training(self, data: FrozenData) -> None:
        train = data.train(views=self.options.views)
        feats = train.features.mean(0) if train.features.dim() == 3 else train.features
        feats = F.normalize(feats, dim=-1)
        self.means = torch.stack([feats[train.labels == c].mean(0) for c in range(len(data.classes))])
        val = data.val()
        SEEN.append({"train": train, "val": val, "classes": list(data.classes.names), "mode": self.training,
                     "grad": torch.is_grad_enabled()})

    def after_training(self, data: FrozenData) -> None:
        val = data.val()
        feats = F.normalize(val.features, dim=-1)
        best = max((1.0, 10.0, 100.0), key=lambda t: (self._scores(feats, t).argmax(-1) == val.labels).sum().item())
        self.temperature = torch.tensor(best)

    def _scores(self, feats, temperature):
        scores = temperature * feats @ self.means.t()
        return scores * self.scale if hasattr(self, "scale") else scores

    def forward(self, batch):
        return MethodOutput(self._scores(F.normalize(batch.image_features.float(), dim=-1), self.temperature))


class Plugin:
    @hookimpl
    def vlprompt_methods(self):
        return [MethodEntry("prototypes", ProtoOptions, Prototypes, "class means of frozen features")]


class TestPrototypesContract(MethodContract):
    method = "prototypes"
    plugin = Plugin()
    cases = [Case({}, fixed_classes=True), Case({"views": 0, "trainable_scale": True}, fixed_classes=True)]


# ------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("fitting"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATASETS_SPEC", str(world["specs"]))
        yield world


@pytest.fixture(scope="module")
def registry(world):
    from vlprompt_core.plugins import build_registry, make_plugin_manager

    return build_registry(*make_plugin_manager(extra=(("fitting", Plugin()),)))


def run(world, registry, out, epochs=0, checkpoints_from=None, **options):
    from vlprompt_core.engine import Engine
    from vlprompt_core.spec import check_spec, validate_spec

    spec = validate_spec({
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "prototypes", **options},
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        "train": {"epochs": epochs, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32",
                  "warmup_epochs": 0, "lr": 0.01},
        "output": str(out),
    }, registry)
    check_spec(spec, registry)
    SEEN.clear()
    return Engine(spec, registry).run(checkpoints_from=checkpoints_from)


def centre_crop_features(backbone, pairs):
    tf = centre_crop(backbone.image_size, backbone.image_mean, backbone.image_std)
    with torch.no_grad():
        return backbone.encode_image(torch.stack([tf(read_rgb(path)) for path, _ in pairs])).float()


def test_the_fit_sees_the_training_and_validation_splits_only(world, registry, tmp_path):
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip

    record = run(world, registry, tmp_path / "run", views=0)
    (seen,) = SEEN
    sample = json.loads((tmp_path / "run" / "fewshot" / "seed1.json").read_text())
    torch.manual_seed(1)  # the run builds its random-weight backbone after set_seed(first seed)
    backbone = build_open_clip(OpenClipOptions(model=str(world["config"]), pretrained=None)).eval()
    assert seen["classes"] == ["red", "green", "blue", "yellow", "purple", "orange"][: len(seen["classes"])]
    assert seen["train"].labels.tolist() == [label for _, label in sample["train"]]
    assert seen["val"].labels.tolist() == [label for _, label in sample["val"]]
    assert len(seen["val"]) == 2 * len(seen["classes"])  # min(shots, 4) per class: never the test split
    assert torch.allclose(seen["train"].features, centre_crop_features(backbone, sample["train"]), atol=1e-5)
    assert torch.allclose(seen["val"].features, centre_crop_features(backbone, sample["val"]), atol=1e-5)
    assert seen["mode"] is False and seen["grad"] is True  # eval mode, autograd on
    assert record["runs"][0]["checkpoint"]  # fitted without gradient steps (epochs 0), still checkpointed


def test_views_are_augmented_and_stacked(world, registry, tmp_path):
    run(world, registry, tmp_path / "run", views=3)
    (seen,) = SEEN
    feats = seen["train"].features
    assert feats.shape[0] == 3 and feats.shape[1] == len(seen["train"])
    assert not torch.equal(feats[0], feats[1])  # different draws of the training transform


def test_fitted_state_is_restored_when_scored_again(world, registry, tmp_path):
    from safetensors.torch import load_file

    first = run(world, registry, tmp_path / "run", epochs=2, trainable_scale=True)
    result = first["runs"][0]
    saved = load_file(str(tmp_path / "run" / result["checkpoint"]))
    assert set(saved) == {"means", "temperature", "scale"}
    assert saved["means"].shape == (6, 32) and saved["temperature"].item() in (1.0, 10.0, 100.0)
    assert not math.isclose(saved["scale"].item(), 1.0)  # the gradient steps ran after the fit
    again = run(world, registry, tmp_path / "eval", epochs=2, trainable_scale=True,
                checkpoints_from=tmp_path / "run")
    assert SEEN == []  # scoring only: nothing fitted again
    assert again["runs"][0]["accuracy"] == result["accuracy"]


def test_a_checkpoint_missing_a_fitted_tensor_is_refused(world, registry, tmp_path):
    from safetensors.torch import load_file, save_file

    from vlprompt_core.engine import assign_trained

    run(world, registry, tmp_path / "run")
    path = next((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    tensors = load_file(str(path))
    del tensors["temperature"]
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    backbone = synthetic_backbone(world)
    method = Prototypes(backbone, ClassSet(["a", "b"]), ProtoOptions())
    with pytest.raises(UserError, match="temperature"):
        assign_trained(method, tensors, tmp_path / "partial.safetensors")


def synthetic_backbone(world):
    from vlprompt_core.builtin.open_clip_backbone import OpenClipOptions, build_open_clip

    torch.manual_seed(0)
    return build_open_clip(OpenClipOptions(model=str(world["config"]), pretrained=None)).eval()


def test_synthetic_frozen_data_shapes(world):
    bb = synthetic_backbone(world)
    data = synthetic_frozen_data(bb, ClassSet(["a", "b", "c"]), per_class=2, val_per_class=1)
    assert data.train().features.shape == (6, bb.embed_dim)
    assert data.train(views=4).features.shape == (4, 6, bb.embed_dim)
    assert data.val().labels.tolist() == [0, 1, 2]
    assert torch.equal(data.train().features, data.train().features)  # deterministic


# ------------------------------------------- methods that score only their own classes


def spec_data(world, method, protocol, **extra):
    return {"backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
            "method": method, "dataset": {"name": "toy", "root": str(world["data"])}, "protocol": protocol,
            "train": {"epochs": 0, "batch_size": 4, "seeds": [1], "device": "cpu", "precision": "fp32"}, **extra}


def test_method_all_leaves_out_a_fixed_class_method_where_unseen_classes_are_scored(world, registry):
    from vlprompt_core.spec import validate_spec

    notes: list[str] = []
    spec = validate_spec(spec_data(world, "all", {"name": "base2novel", "shots": 2}), registry, notes=notes)
    assert "prototypes" not in [m.name for m in spec.method] and "zeroshot" in [m.name for m in spec.method]
    assert ("method: all leaves out prototypes under base2novel: prototypes score only the classes they were "
            "fitted on") in notes  # (and any installed plug-in that scores only its own classes)
    notes.clear()
    spec = validate_spec(spec_data(world, "all", {"name": "few_shot", "shots": 2}), registry, notes=notes)
    assert "prototypes" in [m.name for m in spec.method] and notes == []


def test_validate_refuses_a_fixed_class_method_under_base2novel_in_one_line(world, registry):
    from vlprompt_core.spec import check_spec, validate_spec

    spec = validate_spec(spec_data(world, {"name": "prototypes"}, {"name": "base2novel", "shots": 2}), registry)
    with pytest.raises(UserError) as exc:
        check_spec(spec, registry)
    assert exc.value.problems == ["spec: method 'prototypes' (prototypes) cannot run base2novel, which scores classes "
                                  "it never saw: prototypes score only the classes they were fitted on"]


def test_validate_refuses_a_fixed_class_method_a_target_with_classes_it_cannot_fit(world, registry):
    """Trained on toy5 (5 colours), scored on toy (the same 5 and one more): refused before
    anything runs; a target whose classes are among the trained-on ones passes."""
    from vlprompt_core.spec import check_spec, validate_spec
    from vlprompt_core.testing.worlds import COLOURS

    sixth = list(COLOURS)[5]
    protocol = {"name": "cross_dataset", "shots": 2, "targets": [{"name": "toy", "root": str(world["data"])}]}
    data = spec_data(world, [{"name": "zeroshot"}, {"name": "prototypes"}], protocol)
    data["dataset"] = {"name": "toy5", "root": str(world["data"])}
    with pytest.raises(UserError) as exc:
        check_spec(validate_spec(data, registry), registry)
    assert exc.value.problems == [
        f"spec: method 'prototypes' (prototypes) cannot score protocol.targets[0] (toy): 1 of its 6 classes are not "
        f"among toy5's ({sixth!r}); prototypes score only the classes they were fitted on"]
    data["method"] = "all"
    notes: list[str] = []
    spec = validate_spec(data, registry, notes=notes)
    assert "prototypes" not in [m.name for m in spec.method] and "zeroshot" in [m.name for m in spec.method]
    assert (f"method: all leaves out prototypes under cross_dataset: protocol.targets[0] (toy): 1 of its 6 classes "
            f"are not among toy5's ({sixth!r}); prototypes score only the classes they were fitted on") in notes
    data["dataset"], protocol["targets"] = protocol["targets"][0], [{"name": "toy5", "root": str(world["data"])}]
    notes.clear()
    spec = validate_spec(data, registry, notes=notes)  # toy5's classes are among toy's: nothing left out
    assert "prototypes" in [m.name for m in spec.method] and notes == []


def test_a_target_with_other_classes_fails_that_pair_alone(world, registry, tmp_path):
    from vlprompt_core.engine import Engine
    from vlprompt_core.spec import check_spec, validate_spec

    protocol = {"name": "cross_dataset", "shots": 2, "targets": [{"name": "toy5", "root": str(world["data"])}]}
    spec = validate_spec(spec_data(world, [{"name": "zeroshot"}, {"name": "prototypes"}], protocol,
                                   output=str(tmp_path / "out")), registry)
    check_spec(spec, registry)
    record = Engine(spec, registry).run()
    assert [r["method"] for r in record["runs"]] == ["zeroshot"]
    (failure,) = record["failures"]
    assert failure["method"] == "prototypes" and "cannot score toy5" in failure["error"]
    assert "score only the classes they were fitted on" in failure["error"]
