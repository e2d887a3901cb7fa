"""Every method plug-in is an installable distribution: its wheel, installed alone into a
fresh virtual environment that has vlprompt, adds its methods to ``vlprompt list``;
uninstalling it removes them again. The core names none of them.

The wheels are real (each plug-in's declared build backend, called as ``pip wheel
--no-build-isolation`` calls it: the same bytes), so is the environment (a new ``venv``
that sees this one's packages except the plug-ins), and so are ``pip install`` and ``pip
uninstall`` of each wheel alone. Only the ~1.5 s that every new Python process of that
environment spends importing torch and the core is shared: a server process of the
fresh environment (:data:`SERVER`) imports them once, never a plug-in, and runs each
``pip`` command and each ``vlprompt list --json`` in a child forked from it, which sees
the environment's files as they are at that moment, as a new process would."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which the build backend (hatchling) needs there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())

#: Run by the fresh environment's Python: imports what every ``vlprompt`` and ``pip``
#: process of that environment would (torch, the core with its built-in plug-ins, pip),
#: then answers requests, one JSON line each on stdin (``["pip", ARGS...]`` or ``["vlprompt",
#: ARGS...]``), each in a child forked for it, with a JSON line on stdout: the child's exit
#: code, stdout and stderr. A child starts from this process as it was before any request:
#: no plug-in imported, no registry built, no distribution looked up; it drops the import
#: system's caches of directories and of distributions (``importlib.invalidate_caches``),
#: so that what ``pip`` has just installed or removed is what it finds.
SERVER = r'''
import gc, importlib, json, os, sys, tempfile, traceback

import torch  # noqa: F401
import vlprompt_core.cli
import vlprompt_core.plugins
from pip._internal.cli.main import main as pip_main
import pip._internal.commands.install, pip._internal.commands.uninstall  # noqa: E401 - code only, no state

for name in vlprompt_core.plugins.BUILTIN_PLUGINS:
    importlib.import_module(name)
preloaded = [name for name in sys.modules if name.startswith("vlprompt_plugin_")]
assert not preloaded and vlprompt_core.plugins._REGISTRY is None, preloaded
gc.freeze()  # children's garbage collections leave these objects alone: fewer pages copied on write


def child(command, args):
    importlib.invalidate_caches()
    assert not [name for name in sys.modules if name.startswith("vlprompt_plugin_")]
    sys.argv = [command, *args]
    if command == "pip":
        return pip_main(args)
    assert command == "vlprompt", command
    vlprompt_core.cli.main()
    return 0


def serve(command, args):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                code = child(command, args)
            except SystemExit as exc:  # as Python exits: None is 0, a number itself, else printed and 1
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out.seek(0)
        err.seek(0)
        return {"code": code, "stdout": out.read().decode(), "stderr": err.read().decode()}


print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    command, *args = json.loads(line)
    print(json.dumps(serve(command, args)), flush=True)
'''


class FreshEnvironment:
    """A server (:data:`SERVER`) of the fresh environment's Python; :meth:`run` a command."""

    def __init__(self, python: Path, env: dict, cwd: Path):
        self.process = subprocess.Popen([str(python), "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env, cwd=cwd)
        assert json.loads(self.process.stdout.readline() or "null") == "ready", "the server did not start"

    def run(self, *command: str) -> str:
        """``pip ARGS`` or ``vlprompt ARGS`` in the fresh environment; its stdout (exit code 0 asserted)."""
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline() or "null")
        assert reply is not None, "the server died"
        assert reply["code"] == 0, (command, reply)
        return reply["stdout"]

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def build_wheel(project: Path, dist: Path) -> Path:
    """The project's wheel, as a PEP 517 frontend builds it (``pip wheel --no-build-isolation``):
    the ``build_wheel`` hook of its declared build backend, called in its folder."""
    backend_name, _, attribute = tomllib.loads((project / "pyproject.toml").read_text())["build-system"][
        "build-backend"].partition(":")
    backend = importlib.import_module(backend_name)
    if attribute:
        backend = getattr(backend, attribute)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        return dist / backend.build_wheel(str(dist))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Wheels of every plug-in, and a fresh environment that sees this one's packages
    (vlprompt, torch, ...) except the plug-ins themselves, with its server."""
    tmp = tmp_path_factory.mktemp("wheels")
    dist = tmp / "dist"
    dist.mkdir()
    for plugin in PLUGINS:
        build_wheel(plugin, dist)
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
    server = FreshEnvironment(py, env, tmp)
    yield {"wheels": sorted(dist.glob("*.whl")), "server": server, "purelib": Path(purelib)}
    server.close()


def listed(fresh) -> dict[str, str]:
    data = json.loads(fresh["server"].run("vlprompt", "list", "--json"))
    assert data["failed"] == []
    return {r["name"]: r["distribution"] for r in data["registered"] if r["kind"] in ("method", "logger")}


def pip(fresh, *args):
    fresh["server"].run("pip", "--disable-pip-version-check", "-q", *args)


@pytest.mark.slow  # wheels built, an environment made
def test_each_plugin_builds_a_wheel_with_its_entry_point(fresh):
    assert len(fresh["wheels"]) == len(PLUGINS) >= 6
    for wheel in fresh["wheels"]:
        with zipfile.ZipFile(wheel) as zf:
            entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
            meta = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
        assert "[vlprompt]" in entry_points and "Requires-Dist: vlprompt>=0.1" in meta, wheel.name
        # nothing that only a new process would act on (a .pth file runs at start-up): what the
        # forked children of the fresh environment's server see is what a new process sees
        assert not [n for n in zf.namelist() if n.endswith(".pth")], wheel.name


@pytest.mark.slow  # wheels built, an environment made
def test_each_wheel_installs_alone_adds_its_methods_and_uninstalling_removes_them(fresh):
    before = listed(fresh)
    assert set(before) == {"zeroshot"}  # the built-in baseline only
    added = {}
    for plugin, wheel in zip(PLUGINS, fresh["wheels"], strict=True):
        assert wheel.name.startswith(plugin.name.replace("-", "_") + "-"), (plugin, wheel)
        pip(fresh, "install", "--no-deps", str(wheel))  # alone: beside the core only
        assert [p.name for p in fresh["purelib"].glob("vlprompt_plugin_*.dist-info")] == [
            "-".join(wheel.name.split("-")[:2]) + ".dist-info"], plugin.name  # installed where a new process looks
        new = {k: v for k, v in listed(fresh).items() if k not in before}
        assert new and set(new.values()) == {plugin.name}, (plugin.name, new)  # its own names, all from it
        added.update(new)
        pip(fresh, "uninstall", "-y", plugin.name)
        assert not list(fresh["purelib"].glob("vlprompt_plugin_*")), plugin.name
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
