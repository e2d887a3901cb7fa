"""The core's import layers: no import cycle between vlprompt_core modules, and the
contract (the ``api`` package) stands on leaf modules only: its modules import each
other (never the package's ``__init__``) and leaf modules. Every import counts:
module-level, inside a function and under ``if TYPE_CHECKING:``."""

from __future__ import annotations

import ast
from pathlib import Path

import vlprompt_core

ROOT = Path(vlprompt_core.__file__).parent


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(("vlprompt_core", *parts[:-1 if parts[-1] == "__init__" else None]))] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The vlprompt_core modules ``name`` imports, and the ``__init__`` of each package
    outside its own that importing them runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(filter(None, (package.rsplit(".", node.level - 1)[0] if node.level else "",
                                          node.module)))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(len(parts), 0, -1):  # the module itself, then the packages above it
                above = ".".join(parts[:i])
                if above in known and (i == len(parts) or not name.startswith(above + ".")):
                    found.add(above)
    return found - {name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" on the current path, "done" once fully explored
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    return next(filter(None, (visit(n) for n in sorted(edges) if n not in state)), None)


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_contract_imports_only_leaf_modules():
    edges = graph()
    api = {name for name in edges if name == "vlprompt_core.api" or name.startswith("vlprompt_core.api.")}
    leaves = {name for name, deps in edges.items() if not deps and name not in api}
    for name in sorted(api):
        above = sorted(edges[name] - api - leaves)
        assert not above, f"{name} imports {above}, which import other vlprompt_core modules"
        if name != "vlprompt_core.api":
            assert "vlprompt_core.api" not in edges[name], f"{name} imports the package; import the sibling module"


def test_the_walk_sees_every_kind_of_import(tmp_path):
    (tmp_path / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import sub, VERSION\nimport vlprompt_core.pkg.deep\n"
        "if TYPE_CHECKING:\n    from ..api import Options\n"
        "def f():\n    from ..engine.core import Engine\n    from .. import hookimpl\n")
    known = dict.fromkeys(["vlprompt_core", "vlprompt_core.api", "vlprompt_core.engine", "vlprompt_core.engine.core",
                           "vlprompt_core.pkg", "vlprompt_core.pkg.sub", "vlprompt_core.pkg.deep"], tmp_path)
    assert imported("vlprompt_core.pkg", tmp_path / "__init__.py", known) == {
        "vlprompt_core", "vlprompt_core.api", "vlprompt_core.engine", "vlprompt_core.engine.core",
        "vlprompt_core.pkg.sub", "vlprompt_core.pkg.deep"}
