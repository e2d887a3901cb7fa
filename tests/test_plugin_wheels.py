"""Every method plug-in is an installable distribution: its wheel, installed alone into a
fresh virtual environment that has vlprompt, adds its methods to ``vlprompt list``;
uninstalling it removes them again. The core names none of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Wheels of every plug-in, and a fresh environment that sees this one's packages
    (vlprompt, torch, ...) except the plug-ins themselves."""
    tmp = tmp_path_factory.mktemp("wheels")
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), *map(str, PLUGINS)], check=True, capture_output=True)
    filtered = tmp / "site"
    filtered.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "vlprompt_plugin_" not in entry.name and "vlprompt-plugin-" not in entry.name:
            (filtered / entry.name).symlink_to(entry)
    env_dir = tmp / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # pip: this environment's, through the .pth below
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_vlprompt_env.pth").write_text(f"import site; site.addsitedir({str(filtered)!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return {"wheels": sorted(dist.glob("*.whl")), "python": py, "env": env}


def listed(fresh) -> dict[str, str]:
    out = subprocess.run([str(fresh["python"]), "-m", "vlprompt_core.cli", "list", "--json"], capture_output=True,
                         text=True, env=fresh["env"], check=True).stdout
    data = json.loads(out)
    assert data["failed"] == []
    return {r["name"]: r["distribution"] for r in data["registered"] if r["kind"] in ("method", "logger")}


def pip(fresh, *args):
    subprocess.run([str(fresh["python"]), "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   capture_output=True, env=fresh["env"])


@pytest.mark.slow  # wheels built, an environment made
def test_each_plugin_builds_a_wheel_with_its_entry_point(fresh):
    assert len(fresh["wheels"]) == len(PLUGINS) >= 6
    for wheel in fresh["wheels"]:
        with zipfile.ZipFile(wheel) as zf:
            entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
            meta = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
        assert "[vlprompt]" in entry_points and "Requires-Dist: vlprompt>=0.1" in meta, wheel.name


@pytest.mark.slow  # wheels built, an environment made
def test_each_wheel_installs_alone_adds_its_methods_and_uninstalling_removes_them(fresh):
    before = listed(fresh)
    assert set(before) == {"zeroshot"}  # the built-in baseline only
    added = {}
    for plugin, wheel in zip(PLUGINS, fresh["wheels"], strict=True):
        assert wheel.name.startswith(plugin.name.replace("-", "_") + "-"), (plugin, wheel)
        pip(fresh, "install", "--no-deps", str(wheel))  # alone: beside the core only
        new = {k: v for k, v in listed(fresh).items() if k not in before}
        assert new and set(new.values()) == {plugin.name}, (plugin.name, new)  # its own names, all from it
        added.update(new)
        pip(fresh, "uninstall", "-y", plugin.name)
        assert listed(fresh) == before, plugin.name
    # the package's name is its method's (vlprompt-plugin-coop: coop); a package may add more
    # (vlprompt-plugin-maple: maple, ivlp, language_deep, vpt_deep)
    assert all(added.get(p.name.removeprefix("vlprompt-plugin-").replace("-", "_")) == p.name for p in PLUGINS)


def test_the_core_names_no_method_plugin():
    names = [p.name.removeprefix("vlprompt-plugin-").replace("-", "_") for p in PLUGINS]
    for path in (ROOT / "vlprompt_core").rglob("*.py"):
        if "testing" in path.parts or "embedded" in path.parts:
            continue
        code = path.read_text()
        for name in names:
            assert f'"{name}"' not in code and f"'{name}'" not in code, (path, name)
            assert f"vlprompt_plugin_{name}" not in code, (path, name)
