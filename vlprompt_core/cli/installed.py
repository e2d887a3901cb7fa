"""``vlprompt list`` and ``vlprompt schema``: what the installed plug-ins register, as a
listing and as the JSON Schema of the run spec."""

from __future__ import annotations

import json
import sys

import typer
from rich.table import Table
from rich.text import Text

from ..errors import UserError
from .common import _fail, _one_line, _registry, app, out


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """What is registered, and from which distribution."""
    from ..plugins import KINDS

    try:
        reg = _registry()
    except UserError as exc:
        _fail(exc)
    rows = [
        {"kind": kind, "name": name, "distribution": reg.sources[(kind, name)].distribution,
         "version": reg.sources[(kind, name)].version, "description": reg.get(kind, name).description}
        for kind in KINDS for name in reg.names(kind)
    ]
    failures = [f.__dict__ for f in reg.failures]
    if as_json:
        out.print_json(json.dumps({"registered": rows, "failed": failures}))
        return
    # Two columns, so that the description gets the room an 80-column terminal has: the
    # name, and the description with where it comes from on a dim line under it. Names
    # get at most a third of the width; a longer one (names are typed in specs: never cut)
    # has a line of its own. Text from plug-ins is printed as is (never read as markup),
    # on printable lines.
    name_width = min(max((len(r["name"]) for r in rows), default=8) + 2, max(10, out.width // 3))

    def grid() -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(width=name_width, overflow="fold")
        table.add_column(overflow="fold")
        return table

    parts: list = [Text("vlprompt plug-ins", style="bold"), grid()]
    for i, kind in enumerate(KINDS):
        if i:
            parts[-1].add_row("", "")
        parts[-1].add_row(Text(f"{kind}s", style="bold"), "")
        mine = [r for r in rows if r["kind"] == kind]
        for r in mine:
            origin = "built-in" if r["distribution"] == "vlprompt" else f"{r['distribution']} {r['version']}"
            cell = Text(_one_line(r["description"] or ""))
            cell.append(("\n" if r["description"] else "") + _one_line(origin), style="dim")
            label = "  " + _one_line(r["name"])
            if len(label) > name_width:
                parts += [Text(label, overflow="fold"), grid()]
                label = ""
            parts[-1].add_row(Text(label), cell)
        if not mine:
            parts[-1].add_row(Text("  (none)", style="dim"), "")
    for part in parts:
        if not isinstance(part, Table) or part.row_count:
            out.print(part)
    for f in reg.failures:
        out.print(Text.assemble(("failed:", "red"), " ", _one_line(f"{f.entry_point} ({f.distribution}): {f.error}")))


@app.command()
def schema():
    """JSON Schema of the run spec, including every installed plug-in's options."""
    from ..spec import build_spec_model

    try:
        model = build_spec_model(_registry())
    except UserError as exc:
        _fail(exc)
    sys.stdout.write(json.dumps(model.model_json_schema(), indent=2) + "\n")
