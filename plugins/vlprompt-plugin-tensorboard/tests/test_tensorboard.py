"""The TensorBoard logger on real tiny runs of the embedded world (the tiny CLIP shipped
with vlprompt, a generated dataset): what it writes equals ``results.json``, a run
that does not enable it gets no event file, and a wrong logger name is one error line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlprompt_plugin_tensorboard as tb  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from vlprompt_core.cli import app  # noqa: E402
from vlprompt_core.engine import Engine  # noqa: E402
from vlprompt_core.plugins import build_registry, make_plugin_manager  # noqa: E402
from vlprompt_core.spec import load_spec, resolve_methods, spec_hash, validate_spec  # noqa: E402
from vlprompt_core.testing import LoggerContract  # noqa: E402

FLOAT32 = 1e-6  # relative: event files store float32


class TestTensorBoardContract(LoggerContract):
    """The battery every logger runs (vlprompt_core.testing.LoggerContract)."""

    logger = "tensorboard"
    options = {"log_dir": "tb", "flush_secs": 5}


def spec_data(output: Path, **extra) -> dict:
    data = {
        "backbone": {"name": "open_clip", "model": "vlprompt_tiny", "pretrained": "embedded"},
        "method": [{"name": "zeroshot"}, {"name": "coop", "n_ctx": 2}],
        "dataset": {"name": "embedded_objects"},
        "protocol": {"name": "few_shot", "shots": 1},
        "train": {"epochs": 2, "batch_size": 8, "seeds": [1]},
        "output": str(output),
    }
    data.update(extra)
    return data


@pytest.fixture(scope="module")
def reg():
    return build_registry(*make_plugin_manager())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One data root for the module: the embedded dataset is generated once."""
    root = tmp_path_factory.mktemp("tb_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPROMPT_DATA", str(root))
        yield root


def run(reg, tmp: Path, **extra) -> tuple[dict, Path]:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_data(tmp / "out", **extra)))
    return Engine(load_spec(path, reg), reg, log=lambda line: None).run(), tmp / "out"


@pytest.fixture(scope="module")
def logged(reg, data_root, tmp_path_factory):
    record, out = run(reg, tmp_path_factory.mktemp("logged"), loggers=[{"name": "tensorboard"}])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return record, out, events


def values(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_registered_as_a_logger_with_its_options(reg):
    entry = reg.get("logger", "tensorboard")
    assert entry.options is tb.TensorBoardOptions
    assert reg.sources[("logger", "tensorboard")].distribution == "vlprompt-plugin-tensorboard"


def test_epoch_scalars_equal_results_json(logged):
    record, _, events = logged
    assert record["status"] == "complete"
    coop = next(r for r in record["runs"] if r["method"] == "coop")
    assert len(coop["epochs"]) == 2
    for name, tag in (("loss", "train/loss"), ("train_acc", "train/acc"), ("lr", "lr"), ("time_s", "time_s")):
        logged_values = values(events, f"coop/seed1/{tag}")
        assert [step for step, _ in logged_values] == [0, 1], tag
        for (_, value), epoch in zip(logged_values, coop["epochs"]):
            assert value == pytest.approx(epoch[name], rel=FLOAT32), tag
    assert not [t for t in events.Tags()["scalars"] if t.startswith("zeroshot/seed1/train")]  # nothing trained


def test_accuracies_summaries_and_cost_equal_results_json(logged):
    record, _, events = logged
    for r in record["runs"]:
        prefix = f"{r['method']}/seed{r['seed']}"
        for split, accuracy in r["accuracy"].items():
            step = len(r["epochs"])
            assert values(events, f"{prefix}/accuracy/{split}") == [(step, pytest.approx(accuracy, rel=FLOAT32))]
        for metric, value in r["summary"].items():
            assert values(events, f"{prefix}/summary/{metric}")[0][1] == pytest.approx(value, rel=FLOAT32)
        total = r["cost"]["time_s"]["total"]
        assert values(events, f"{prefix}/cost/time_s/total")[0][1] == pytest.approx(total, rel=FLOAT32)
        assert f"{prefix}/cost/memory" not in events.Tags()["scalars"]  # "rss": numbers only
    for label, metrics in record["summary"].items():
        for metric, stats in metrics.items():
            assert values(events, f"{label}/mean/{metric}") == [(0, pytest.approx(stats["mean"], rel=FLOAT32))]
    assert {"spec", "results"} <= {t.split("/")[0] for t in events.Tags()["tensors"]}


def test_the_writer_is_closed_at_the_end_of_the_run(logged):
    _, out, _ = logged
    assert tb._key(str(out)) not in tb._runs


def test_a_run_without_the_section_writes_no_event_file(reg, data_root, tmp_path):
    record, out = run(reg, tmp_path)
    assert record["status"] == "complete" and record["spec"]["loggers"] == []
    assert not list(out.rglob("*tfevents*")) and not (out / "tensorboard").exists()
    assert not tb._runs


def test_a_logger_section_changes_no_results_key(reg, tmp_path):
    plain = validate_spec(spec_data(tmp_path), reg)
    logged = validate_spec(spec_data(tmp_path, loggers={"name": "tensorboard", "log_dir": "tb"}), reg)
    assert logged.loggers[0].log_dir == "tb"  # one section stands for a list of one
    assert spec_hash(plain) == spec_hash(logged)
    assert [m.key for m in resolve_methods(plain, reg)] == [m.key for m in resolve_methods(logged, reg)]


def test_an_unknown_logger_is_one_error_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_data(tmp_path / "out", loggers=[{"name": "wandb", "project": "x"}])))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "loggers[0].name" in lines[0] and "'wandb'" in lines[0] and "'tensorboard'" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_runs_are_kept_apart_and_a_writer_left_open_is_closed(tmp_path):
    """Hooks called directly: two folders at once (one with its own log_dir), and a run
    that failed (no run_end) whose writer the next start in its folder closes."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    tb.vlprompt_run_start({"loggers": [{"name": "tensorboard"}]}, a)
    failed = tb._runs[tb._key(a)].writer
    tb.vlprompt_run_start({"loggers": [{"name": "tensorboard"}]}, a)
    assert failed.all_writers is None  # closed
    tb.vlprompt_run_start({"loggers": {"name": "tensorboard", "log_dir": "tb"}}, b)
    for out, loss in ((a, 1.0), (b, 2.0)):
        tb.vlprompt_epoch_end("m", 1, 0, {"epoch": 0, "loss": loss, "loss.kl": loss / 2}, out)
        tb.vlprompt_evaluation_done("m", 1, {"accuracy": {"test": loss}, "epochs": [{}]}, out)
        tb.vlprompt_run_end({"summary": {"m": {"accuracy": {"mean": loss, "std": 0.0, "n": 1}}}}, out)
    assert not tb._runs
    for folder, loss in ((Path(a) / "tensorboard", 1.0), (Path(b) / "tb", 2.0)):
        events = EventAccumulator(str(folder))
        events.Reload()
        assert values(events, "m/seed1/train/loss") == [(0, loss)]
        assert values(events, "m/seed1/train/loss.kl") == [(0, loss / 2)]
        assert values(events, "m/seed1/accuracy/test") == [(1, loss)]
        assert values(events, "m/mean/accuracy") == [(0, loss)]
    tb.vlprompt_epoch_end("m", 1, 0, {"loss": 1.0}, str(tmp_path / "c"))  # never started: nothing, no error
    assert not (tmp_path / "c").exists()
