"""Third-party plug-ins through the real entry-point machinery: a package outside
this repo (a ``.dist-info`` on ``PYTHONPATH``, as pip would install it) is found,
listed with its distribution, and runs through ``vlprompt run``; a broken one is
reported without breaking the rest; a name clash names both sides.

The commands run in this process (:func:`test_cli.vlprompt`: the registry built again
from the entry points found on the import path, as a new process builds it), the
fake distribution's folder first on ``sys.path`` as ``PYTHONPATH`` puts it (and on
``PYTHONPATH`` too, for any process a command starts)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from test_cli import vlprompt, write_spec

THIRD_PARTY = '''
"""A throw-away method: zero-shot text features plus a learned per-class bias."""
import torch
from torch import nn
from vlprompt_core import hookimpl
from vlprompt_core.api import MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.prompting import class_text_features
from vlprompt_kernels import cosine_logits


class BiasOptions(Options):
    scale: float = 1.0


class Bias(PromptMethod):
    inputs = ("image_features",)

    def __init__(self, backbone, classes, options):
        super().__init__(backbone, classes, options)
        self.set_classes(classes)

    def set_classes(self, classes):
        self.text = class_text_features(self.backbone, classes.names, classes.templates[:1])
        self.bias = nn.Parameter(torch.zeros(len(classes)))

    def forward(self, batch):
        logits = cosine_logits(batch.image_features.float(), self.text, self.backbone.logit_scale)
        return MethodOutput(logits + self.options.scale * self.bias)


@hookimpl
def vlprompt_methods():
    return [MethodEntry("bias", BiasOptions, Bias, "third-party test method")]


@hookimpl
def vlprompt_epoch_end(method, seed, epoch, metrics):
    _log({"event": "epoch_end", "method": method, "seed": seed, "epoch": epoch, "loss": metrics["loss"]})


@hookimpl
def vlprompt_evaluation_done(method, seed, results):
    _log({"event": "evaluation_done", "method": method, "seed": seed, "accuracy": results["accuracy"]})


def _log(event):
    import json, os
    with open(os.environ["BIAS_EVENTS"], "a") as f:
        f.write(json.dumps(event) + "\\n")
'''


def install_fake_distribution(site: Path, dist: str, module: str, source: str, entry_points: dict[str, str]):
    """What ``pip install`` leaves behind: the module and a ``.dist-info`` with entry points."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(
        "[vlprompt]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    )


@pytest.fixture()
def site(tmp_path, monkeypatch):
    """An empty folder first on the import path, for a test's fake distributions; taken
    off again afterwards, with the modules imported from it, so that no other test sees them."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))  # importlib's caches invalidated: what is written later is found
    yield site
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(site)):
            del sys.modules[name]


def env_with(site: Path, world) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "VLPROMPT_DATASETS_SPEC": str(world["specs"])}


@pytest.mark.slow  # a fake distribution installed, then `vlprompt list`, `vlprompt run` (2 seeds)
def test_third_party_method_is_listed_and_runs(world, tmp_path, site):
    install_fake_distribution(site, "vlprompt-plugin-bias", "vlprompt_plugin_bias", THIRD_PARTY,
                              {"bias": "vlprompt_plugin_bias"})
    env = env_with(site, world)
    listed = json.loads(vlprompt("list", "--json", env_extra=env).stdout)
    row = next(r for r in listed["registered"] if r["name"] == "bias")
    assert (row["kind"], row["distribution"], row["version"]) == ("method", "vlprompt-plugin-bias", "0.3.1")

    spec = write_spec(tmp_path / "spec.yaml", world, {"name": "few_shot", "shots": 2},
                      method=[{"name": "bias", "scale": 2.0}])
    events = tmp_path / "events.jsonl"
    proc = vlprompt("run", str(spec), env_extra={**env, "BIAS_EVENTS": str(events)})
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"bias"}
    # its lifecycle hooks saw every epoch and every evaluation
    seen = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["seed"], e["epoch"]) for e in seen if e["event"] == "epoch_end"] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    done = [e for e in seen if e["event"] == "evaluation_done"]
    assert [e["seed"] for e in done] == [1, 2]
    assert [e["accuracy"] for e in done] == [r["accuracy"] for r in results["runs"]]
    assert all(r["cost"]["trainable_parameters"] == 6 for r in results["runs"])
    assert results["versions"]["vlprompt-plugin-bias"] == "0.3.1"
    # its own options model validates its own keys
    bad = write_spec(tmp_path / "bad.yaml", world, {"name": "few_shot"}, method={"name": "bias", "scale": "x"})
    proc = vlprompt("validate", str(bad), env_extra=env)
    assert proc.returncode == 2 and "method.scale" in proc.stderr


def test_broken_plugin_is_reported_and_others_keep_working(world, site):
    install_fake_distribution(site, "vlprompt-plugin-broken", "vlprompt_plugin_broken",
                              "raise ImportError('needs libfoo')\n", {"broken": "vlprompt_plugin_broken"})
    proc = vlprompt("list", "--json", env_extra=env_with(site, world))
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert ("method", "coop") in {(r["kind"], r["name"]) for r in listed["registered"]}
    [failure] = listed["failed"]
    assert failure["distribution"] == "vlprompt-plugin-broken"
    assert failure["entry_point"].startswith("broken = ")
    assert "needs libfoo" in failure["error"]
    human = vlprompt("list", env_extra=env_with(site, world))
    assert human.returncode == 0 and "vlprompt-plugin-broken" in human.stdout + human.stderr


def test_two_plugins_claiming_one_name_is_a_clear_error(world, site):
    clash = THIRD_PARTY.replace('MethodEntry("bias"', 'MethodEntry("coop"')
    install_fake_distribution(site, "vlprompt-plugin-clash", "vlprompt_plugin_clash", clash,
                              {"clash": "vlprompt_plugin_clash"})
    proc = vlprompt("list", env_extra=env_with(site, world))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'coop' is registered twice" in proc.stderr
    assert "vlprompt-plugin-coop" in proc.stderr and "vlprompt-plugin-clash" in proc.stderr

