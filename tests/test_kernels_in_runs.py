"""The fused-op backend in runs: chosen by the spec or the environment, said once per
run, stored in results.json; and every method plug-in goes through the ops' API."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vlprompt_core.engine import Engine
from vlprompt_core.spec import validate_spec

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = sorted(ROOT.glob("plugins/*/src/**/*.py"))


def spec_data(world, tmp_path, **train):
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": {"name": "zeroshot"},
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 1},
        "train": {"epochs": 1, "seeds": [1], "device": "cpu", **train},
        "output": str(tmp_path / "out"),
    }


def spec(world, registry, tmp_path, **train):
    return validate_spec(spec_data(world, tmp_path, **train), registry)


def test_the_backend_is_recorded_and_said_once(world, registry, tmp_path, monkeypatch):
    monkeypatch.delenv("VLPROMPT_KERNELS", raising=False)
    logs: list[str] = []
    record = Engine(spec(world, registry, tmp_path), registry, log=logs.append).run()
    assert record["kernels"]["backend"] == "reference" and record["kernels"]["device"] == "cpu"
    assert [line for line in logs if line.startswith("kernels:")] == [
        f"kernels: reference on cpu ({record['kernels']['reason']})"]


def test_forcing_triton_on_cpu_is_one_clear_line(world, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    path = tmp_path / "spec.yaml"
    data = spec_data(world, tmp_path, kernels="triton")
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLPROMPT_KERNELS")}
    env.update(HF_HUB_OFFLINE="1", VLPROMPT_DATASETS_SPEC=str(world["specs"]))
    proc = subprocess.run([sys.executable, "-m", "vlprompt_core.cli", "run", str(path)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.kernels: ") and "CUDA" in errors[0]


def test_the_spec_choice_is_used_and_undone_after_the_run(world, registry, tmp_path, monkeypatch):
    import vlprompt_kernels

    monkeypatch.delenv("VLPROMPT_KERNELS", raising=False)
    record = Engine(spec(world, registry, tmp_path, kernels="reference"), registry).run()
    assert record["kernels"]["requested"] == "reference" and record["kernels"]["source"] == "use_backend()"
    assert vlprompt_kernels.backend_info()["requested"] == "auto"  # the run's choice did not leak


def test_the_environment_variable_chooses_when_the_spec_does_not(world, registry, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_KERNELS", "reference")
    record = Engine(spec(world, registry, tmp_path), registry).run()
    assert record["kernels"]["requested"] == "reference" and "VLPROMPT_KERNELS" in record["kernels"]["source"]


def test_there_are_method_plugins_to_check():
    assert len(PLUGIN_SOURCES) >= 6


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: p.parts[-4])
def test_plugins_use_the_ops_api_and_no_other_plugin(path):
    """No plug-in concatenates text prompts or computes cosine logits by hand, and none
    imports another plug-in."""
    source = path.read_text()
    tree = ast.parse(source)
    own = path.parts[-2]
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    others = {m for m in imported if m.startswith("vlprompt_plugin_") and not m.startswith(own)}
    assert not others, f"{path} imports {others}"
    if "logit_scale" in source or "normalize(" in source:  # it scores features itself (a wrapper may not)
        assert "from vlprompt_kernels import" in source and "cosine_logits" in source
    for lineno, line in enumerate(source.splitlines(), 1):
        code = line.split("#")[0]
        # cosine logits by hand: a matmul / einsum next to the logit scale or a normalisation
        assert not re.search(r"logit_scale.*(@|matmul|einsum|\.mm\()|(@|matmul|einsum).*logit_scale", code), \
            f"{path}:{lineno}: cosine logits by hand; use vlprompt_kernels.cosine_logits"
        assert not re.search(r"normalize\(.*\)\s*@|@\s*\w*\.?normalize\(", code), f"{path}:{lineno}"
        # text prompts by concatenation: CoOp's [prefix | ctx | suffix]
        assert not re.search(r"torch\.cat\(.*(prefix|suffix|ctx)", code), \
            f"{path}:{lineno}: prompts by concatenation; use PromptTable / vlprompt_kernels.assemble_prompts"
        assert "token_prefix" not in code and "token_suffix" not in code, f"{path}:{lineno}"


def test_the_hand_rolled_patterns_are_caught():
    """The checks above can fail: each pattern is found in a line that breaks the rule."""
    bad = ["logits = logit_scale * img @ txt.t()", "x = F.normalize(a, dim=-1) @ b.T",
           "prompts = torch.cat([prefix, ctx, suffix], dim=1)"]
    patterns = [r"logit_scale.*(@|matmul|einsum|\.mm\()|(@|matmul|einsum).*logit_scale",
                r"normalize\(.*\)\s*@|@\s*\w*\.?normalize\(", r"torch\.cat\(.*(prefix|suffix|ctx)"]
    for line, pattern in zip(bad, patterns):
        assert re.search(pattern, line)
