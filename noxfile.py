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


#: as scripts/test.sh: in parallel, a module's (or test class's) tests on one worker, the
#: longest modules first (tests/conftest.py)
PARALLEL = ["-n", "auto", "--maxprocesses", "4", "--dist", "loadscope", "--no-loadscope-reorder"]


@nox.session
def tests(session: nox.Session) -> None:
    install(session)
    session.run("pytest", *PARALLEL, *session.posargs, env=ENV)


@nox.session
def quickstart(session: nox.Session) -> None:
    install(session)
    session.run("vlprompt", "run", "examples/quickstart.yaml", env=ENV)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (benchmarks/README.md): ``engine`` (the engine against textbook mode) and
    ``kernels`` (the fused ops; research shapes on a CUDA GPU, smoke mode elsewhere). No
    arguments: both, full size. ``nox -s bench -- engine --smoke`` or
    ``nox -s bench -- kernels --dtype bf16 --json bench.json``: one, with its arguments."""
    install(session)
    scripts = ["engine", "kernels"]
    args = list(session.posargs)
    if args and args[0] in scripts:
        scripts, args = [args[0]], args[1:]
    for script in scripts:
        # no TRITON_INTERPRET here: on a GPU the kernels must be compiled (the scripts set it on CPUs)
        session.run("python", f"benchmarks/{script}.py", *args, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "vlprompt_core", "kernels", "plugins", "tests", "benchmarks")
