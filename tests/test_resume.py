"""Results keyed by (method section, seed): reruns train only what changed or is new;
nothing of other settings is overwritten; prompts are scored again without training."""

from __future__ import annotations

import importlib
import json

import pytest
import yaml

from test_cli import vlprompt
from test_plugins import THIRD_PARTY, env_with, install_fake_distribution, site  # noqa: F401 - a fixture
from vlprompt_core.engine import Engine
from vlprompt_core.errors import UserError
from vlprompt_core.spec import validate_spec


def spec_data(world, output, method, protocol=None, **train):
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": method,
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": protocol or {"name": "few_shot", "shots": 2},
        "train": {"epochs": 1, "batch_size": 4, "seeds": [1], "device": "cpu", **train},
        "output": str(output),
    }


def run(registry, data, logs=None, **kw):
    """Run ``data``; the engine's messages (but the kernels line) go to ``logs``."""
    sink = logs if logs is not None else []
    return Engine(validate_spec(data, registry), registry,
                  log=lambda line: line.startswith("kernels:") or sink.append(line)).run(**kw)


def test_installing_a_plugin_then_rerunning_method_all_trains_only_it(world, tmp_path, site):  # noqa: F811
    """``method: all`` run, then a plug-in installed (into ``site``, an empty folder on the
    import path so far) and the same command again: it trains the new method alone. Both
    runs are called in this process, each with the registry built again, as a fresh
    process builds it (``vlprompt``)."""
    spec = tmp_path / "all.yaml"
    spec.write_text(yaml.safe_dump(spec_data(world, tmp_path / "out", "all")))
    env = {"VLPROMPT_DATASETS_SPEC": str(world["specs"])}
    first = vlprompt("run", str(spec), env_extra=env)
    assert first.returncode == 0, first.stderr
    before = json.loads((tmp_path / "out" / "results.json").read_text())
    trained = {r["method"] for r in before["runs"]}
    assert "coop" in trained and "bias" not in trained
    ckpts = {p.name: p.read_bytes() for p in (tmp_path / "out" / "checkpoints").iterdir()}

    install_fake_distribution(site, "vlprompt-plugin-bias", "vlprompt_plugin_bias", THIRD_PARTY,
                              {"bias": "vlprompt_plugin_bias"})
    importlib.invalidate_caches()  # the new files are seen
    events = tmp_path / "events.jsonl"
    second = vlprompt("run", str(spec), env_extra={**env_with(site, world), "BIAS_EVENTS": str(events)})
    assert second.returncode == 0, second.stderr
    after = json.loads((tmp_path / "out" / "results.json").read_text())
    for label in trained:
        assert f"{label} seed 1: already in" in second.stderr
        old = next(r for r in before["runs"] if r["method"] == label)
        assert next(r for r in after["runs"] if r["method"] == label) == old
    assert {r["method"] for r in after["runs"]} == trained | {"bias"}
    assert "bias seed 1: already" not in second.stderr  # it was trained, not skipped
    assert [json.loads(x)["method"] for x in events.read_text().splitlines()].count("bias") == 2  # epoch + done
    for name, data in ckpts.items():  # the earlier checkpoints were left alone
        assert (tmp_path / "out" / "checkpoints" / name).read_bytes() == data
    assert not list((tmp_path / "out").glob("results.*.json"))  # nothing had to be moved aside


def test_changed_options_retrain_only_that_method_and_keep_the_old_results(world, registry, tmp_path):
    out = tmp_path / "out"
    logs: list[str] = []
    first = run(registry, spec_data(world, out, [{"name": "zeroshot"}, {"name": "coop", "n_ctx": 2}]))
    second = run(registry, spec_data(world, out, [{"name": "zeroshot"}, {"name": "coop", "n_ctx": 3}]), logs)
    assert logs[0].endswith("moved to results." + first["spec_hash"] + ".json")
    assert any(line.startswith("zeroshot seed 1: already in") for line in logs)
    assert not any(line.startswith("coop seed 1: already") for line in logs)
    zs = [r for r in first["runs"] if r["method"] == "zeroshot"]
    assert [r for r in second["runs"] if r["method"] == "zeroshot"] == zs
    aside = json.loads((out / f"results.{first['spec_hash']}.json").read_text())
    assert aside["runs"] == first["runs"]
    old_ckpt, new_ckpt = (next(r for r in rec["runs"] if r["method"] == "coop")["checkpoint"]
                          for rec in (first, second))
    assert old_ckpt != new_ckpt and (out / old_ckpt).is_file() and (out / new_ckpt).is_file()


def test_a_new_label_reuses_the_result(world, registry, tmp_path):
    out = tmp_path / "out"
    run(registry, spec_data(world, out, {"name": "coop", "n_ctx": 2}))
    logs: list[str] = []
    again = run(registry, spec_data(world, out, {"name": "coop", "n_ctx": 2, "label": "mine"}), logs)
    assert logs[1:] == [f"mine seed 1: already in {out / 'results.json'}, skipped"]
    assert "held results now kept under new labels: moved to" in logs[0]  # the earlier record stays as it was
    assert [r["method"] for r in again["runs"]] == ["mine"] and list(again["summary"]) == ["mine"]


def test_a_different_few_shot_sample_is_moved_aside(world, registry, tmp_path):
    out = tmp_path / "out"
    run(registry, spec_data(world, out, {"name": "zeroshot"}))
    first = (out / "fewshot" / "seed1.json").read_text()
    run(registry, spec_data(world, out, {"name": "zeroshot"}, protocol={"name": "few_shot", "shots": 1}))
    aside = [p for p in (out / "fewshot").iterdir() if p.name != "seed1.json"]
    assert len(aside) == 1 and aside[0].read_text() == first
    assert len(json.loads((out / "fewshot" / "seed1.json").read_text())["train"]) == 6


def test_eval_scores_saved_prompts_without_training(world, registry, tmp_path):
    trained = run(registry, spec_data(world, tmp_path / "train", {"name": "coop", "n_ctx": 2}, seeds=[1, 2]))
    dg = {"name": "domain_generalisation", "shots": 2, "targets": [{"name": "toy_shift", "root": str(world["data"])}]}
    logs: list[str] = []
    scored = run(registry, spec_data(world, tmp_path / "dg", {"name": "coop", "n_ctx": 2}, protocol=dg, seeds=[1, 2]),
                 logs, checkpoints_from=tmp_path / "train")
    assert sum("scoring the prompts of" in line for line in logs) == 2
    for old, new in zip(trained["runs"], scored["runs"]):
        assert new["epochs"] == [] and new["checkpoint"] is None
        assert new["checkpoint_from"] == str(tmp_path / "train" / old["checkpoint"])
        assert new["accuracy"]["toy"] == old["accuracy"]["test"]  # same prompts, same test split
        assert "toy_shift" in new["accuracy"]
    assert scored["checkpoints_from"] == str(tmp_path / "train")


def test_eval_refuses_prompts_trained_with_other_options(world, registry, tmp_path):
    run(registry, spec_data(world, tmp_path / "train", {"name": "coop", "n_ctx": 2}))
    with pytest.raises(UserError) as exc:
        run(registry, spec_data(world, tmp_path / "other", {"name": "coop", "n_ctx": 2, "class_token_position": "front"}),
            checkpoints_from=tmp_path / "train")
    (line,) = exc.value.problems
    assert "trained as options" in line and '"class_token_position": "end"' in line
    with pytest.raises(UserError, match="no results to take checkpoints from"):
        run(registry, spec_data(world, tmp_path / "x", {"name": "coop"}), checkpoints_from=tmp_path / "nothing")


def test_eval_command_defaults_to_the_runs_own_checkpoints(world, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(spec_data(world, tmp_path / "out", {"name": "coop", "n_ctx": 2})))
    env = {"VLPROMPT_DATASETS_SPEC": str(world["specs"])}
    assert vlprompt("run", str(spec), env_extra=env).returncode == 0
    proc = vlprompt("eval", str(spec), env_extra=env)
    assert proc.returncode == 0, proc.stderr
    trained = json.loads((tmp_path / "out" / "results.json").read_text())
    scored = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert scored["runs"][0]["accuracy"] == trained["runs"][0]["accuracy"]
    assert scored["runs"][0]["epochs"] == []
