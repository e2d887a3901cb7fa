"""The hook documentation is complete, and the example method in the docs runs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from vlprompt_core import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("vlprompt_")]


def test_there_are_hooks():
    assert {"vlprompt_methods", "vlprompt_run_end"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hookspec_docstring_says_when_what_and_returns(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    assert re.search(r"\bCalled\b", doc), f"{name}: say when it is called"
    assert ":return:" in doc, f"{name}: say what it returns and how results combine"
    for arg in inspect.signature(fn).parameters:
        assert f":param {arg}:" in doc, f"{name}: document argument {arg!r}"


def test_every_hook_has_a_section_in_the_reference_and_no_other():
    text = (DOCS / "hooks.md").read_text()
    sections = re.findall(r"^## (vlprompt_\w+)$", text, flags=re.M)
    assert sorted(sections) == sorted(HOOKS)
    for name in HOOKS:
        body = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert "**When:**" in body and "**Returns:**" in body, name
        for arg in inspect.signature(getattr(hookspecs, name)).parameters:
            assert f"{arg}:" in body or f"`{arg}`" in body, (name, arg)


def test_writing_plugins_covers_every_kind():
    text = (DOCS / "writing-plugins.md").read_text()
    for kind in ("method", "backbone", "dataset", "protocol", "logger"):
        assert re.search(rf"^## An? {kind}$", text, flags=re.M), kind


def test_the_example_method_in_the_docs_runs(tiny_backbone):
    text = (DOCS / "writing-plugins.md").read_text()
    code = re.search(r"## A method\n.*?```python\n(.*?)```", text, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "writing-plugins.md", "exec"), namespace)
    from vlprompt_core.api import Batch, ClassSet
    from vlprompt_core.engine import optimizer_groups
    from vlprompt_core.plugins import _entry_problem

    (entry,) = namespace["vlprompt_methods"]()
    assert _entry_problem("method", entry) is None  # its recipe names real fields
    method = entry.build(tiny_backbone, ClassSet(["red", "blue", "green"]), entry.options())
    feats = tiny_backbone.encode_image(torch.randn(2, 3, 16, 16))
    out = method(Batch(image_features=feats, labels=torch.tensor([0, 2])))
    assert out.logits.shape == (2, 3)
    method.loss(out, Batch(labels=torch.tensor([0, 2]))).backward()
    assert method.ctx.grad is not None and method.log_temperature.grad is not None
    assert [g.weight_decay for g in optimizer_groups(method)] == [None, 0.0]


def test_the_example_method_states_what_it_uses(tiny_backbone):
    text = (DOCS / "writing-plugins.md").read_text()
    code = re.search(r"## A method\n.*?```python\n(.*?)```", text, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "writing-plugins.md", "exec"), namespace)
    from vlprompt_core.api import BackboneInfo
    from vlprompt_core.errors import UserError

    (entry,) = namespace["vlprompt_methods"]()
    info = BackboneInfo.of(tiny_backbone)
    used = entry.effective(entry.options(ctx_init="a photo of"), info)
    assert used.options.n_ctx == 3 and used.notes  # one vector per token of the words, said
    with pytest.raises(UserError, match="n_ctx: 2, but ctx_init 'a photo of a' makes 4"):
        entry.effective(entry.options(n_ctx=2, ctx_init="a photo of a"), info)


def test_hooks_md_tells_the_three_kinds_of_hook_apart():
    text = (DOCS / "hooks.md").read_text()
    section = text.split("## Which hook is which\n", 1)[1].split("\n## ", 1)[0]
    for kind in ("Registration hooks", "Lifecycle hooks", "A method's training hooks", "Block hooks"):
        assert f"**{kind}**" in section, kind
    for name in ("parameter_groups", "loss", "predict", "on_epoch_end", "effective_options", "block_hook"):
        assert f"`{name}" in section, name
    assert "Published.average" in text
