"""Developer sessions: ``nox -s tests``, ``nox -s quickstart``, ``nox -s lint``, ``nox -s bench``.

Each session installs the project the way ``scripts/bootstrap.sh`` does (torch
pinned to the builds kept on these machines, everything else editable).
"""

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
ENV = {"HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}


def install(session: nox.Session) -> None:
    session.install(*TORCH)
    plugins = [f"-e{p}" for p in sorted(__import__("glob").glob("plugins/*/"))]
    session.install("-ekernels", "-e.[test]", *plugins)


@nox.session
def tests(session: nox.Session) -> None:
    install(session)
    session.run("pytest", *session.posargs, env=ENV)


@nox.session
def quickstart(session: nox.Session) -> None:
    install(session)
    session.run("vlprompt", "run", "examples/quickstart.yaml", env=ENV)


@nox.session
def bench(session: nox.Session) -> None:
    """Kernel benchmark (benchmarks/README.md): research shapes on a CUDA GPU, smoke mode
    elsewhere (Triton in its interpreter). Arguments go to the script, e.g.
    ``nox -s bench -- --dtype bf16 --json bench.json``."""
    install(session)
    # no TRITON_INTERPRET here: on a GPU the kernels must be compiled (the script sets it on CPUs)
    session.run("python", "benchmarks/kernels.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "vlprompt_core", "kernels", "plugins", "tests", "benchmarks")
