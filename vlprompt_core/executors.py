"""Where the runs of a sweep go: this process, N local processes, or Ray.

Every executor calls :func:`execute_run` once per run, wherever it runs it; each
run writes its own results folder (under the sweep's output folder, which every
worker must see: a shared file system on a cluster), exactly as ``vlprompt run``
does. A run that fails is reported in its :class:`~vlprompt_core.sweep.Outcome`
and the others go on.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .engine import Engine, PluginError, ProgressReporter, interruption, log_traceback
from .engine.faults import armed, catch_stop_signals
from .errors import UserError, os_error, storage_problem
from .plugins import get_registry
from .spec import check_spec, validate_spec
from .sweep import Outcome, Run

#: Environment variables a run depends on, handed to Ray workers (``VLPROMPT_*`` too).
PASSED_ENV = ("HF_HUB_OFFLINE", "TRITON_INTERPRET", "HF_HOME", "TORCH_HOME", "OPEN_CLIP_CACHE")

OnDone = Callable[[Run, Outcome], None]


def execute_run(data: dict, cwd: str | None = None, threads: int | None = None, progress=None) -> dict:
    """Run one validated spec (as plain data) to the end in this process and say how
    it ended (an :class:`Outcome` as a dict, so that it travels between processes).
    Only an interruption (Ctrl-C, SIGTERM) escapes; whatever else stops the run is the outcome."""
    if cwd and Path(cwd).is_dir():
        os.chdir(cwd)  # relative paths of the spec (data roots, caches) mean what they meant to the sweep
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    output = Path(data["output"])
    try:
        reg = get_registry()
        spec = validate_spec(data, reg, str(output))
        check_spec(spec, reg, str(output))
        output.mkdir(parents=True, exist_ok=True)
        with open(output / "run.log", "a") as log:
            engine = Engine(spec, reg, progress or ProgressReporter(), log=lambda m: print(m, file=log, flush=True))
            record = engine.run()
        status = "failed" if record["failures"] else "complete"
        outcome = Outcome(status, failures=record["failures"],
                          error="; ".join(f["error"] for f in record["failures"]))
    except UserError as exc:
        outcome = Outcome("failed", error="; ".join(exc.problems))
    except PluginError as exc:
        outcome = Outcome("failed", error=str(exc))
    except OSError as exc:  # its folder or run.log, before the engine could say so
        outcome = Outcome("failed", error=storage_problem(os_error(exc, output)))
    except Exception as exc:  # noqa: BLE001 - one run's crash is its outcome, the sweep goes on
        log = log_traceback(output, "the run", exc)
        outcome = Outcome("failed", error=f"{type(exc).__name__}: {exc} ({log})")
    finally:
        torch.set_num_threads(before)
    outcome.time_s = time.perf_counter() - started
    return outcome.__dict__


class LocalExecutor:
    """Runs on this machine: one at a time in this process (``jobs=1``, with the
    engine's own progress bars), or ``jobs`` at a time in fresh processes."""

    name = "local"

    def __init__(self, jobs: int = 1, cpus: int | None = None):
        self.jobs = jobs
        self.cpus = cpus  # torch threads per run; default: the cores shared by the parallel runs

    def run(self, runs: list[Run], on_done: OnDone, progress=None) -> None:
        """Each run to its end, ``on_done`` told of each. Stopped (Ctrl-C, SIGTERM), the
        runs under way stop too, each recording that it was interrupted (in its
        ``results.json`` and its outcome), and the interruption is raised again."""
        cwd = os.getcwd()
        if self.jobs == 1:
            for run in runs:
                try:
                    outcome = execute_run(run.data, cwd, self.cpus, progress)
                except KeyboardInterrupt as exc:
                    on_done(run, Outcome("interrupted", error=interruption(exc)))
                    raise
                on_done(run, Outcome(**outcome))
            return
        threads = self.cpus or max(1, (os.cpu_count() or 1) // self.jobs)
        context = multiprocessing.get_context("spawn")  # torch and fork do not mix
        waiting, running = list(runs), {}
        with cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=context, initializer=_worker_start,
                                    initargs=(os.getpid(),)) as pool:
            try:
                while waiting or running:
                    while waiting and len(running) < self.jobs:  # none queued: a stopped sweep starts nothing more
                        run = waiting.pop(0)
                        try:
                            running[pool.submit(_worker_run, run.data, cwd, threads)] = run
                        except cf.process.BrokenProcessPool as exc:  # a worker died (killed, out of memory)
                            on_done(run, Outcome("failed", error=f"not started: {exc}"))
                    finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for future in finished:
                        on_done(running.pop(future), _outcome(future))
            except KeyboardInterrupt:
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    if process.is_alive():
                        process.terminate()  # SIGTERM: a worker's run stops and records it (a second is ignored)
                for future in cf.as_completed(list(running)):
                    on_done(running.pop(future), _outcome(future))
                raise


def _outcome(future: cf.Future) -> Outcome:
    """How the run of a worker process ended."""
    exc = future.exception()
    if exc is None:
        return Outcome(**future.result())
    if isinstance(exc, KeyboardInterrupt):  # stopped between its record and its return
        return Outcome("interrupted", error=interruption(exc))
    return Outcome("failed", error=f"its process ended: {type(exc).__name__}: {exc}")  # killed, out of memory


def _worker_start(sweep_pid: int) -> None:
    """In each worker process of a parallel sweep, first: it stops with the sweep.
    SIGTERM (sent by the sweep when it is stopped, or by a scheduler to every process)
    and Ctrl-C stop the run it is running, which records that it was interrupted; a
    worker between runs only notes it (stopping it would break the pool while its
    siblings record theirs). On Linux, the kernel sends it SIGTERM when the sweep's
    process dies, however it dies (``kill -9`` included); a worker whose sweep is gone
    exits."""
    global _SWEEP_PID
    _SWEEP_PID = sweep_pid
    catch_stop_signals(signal.SIGTERM, signal.SIGINT, armed=False, idle=_exit_if_orphaned)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    _exit_if_orphaned()


_SWEEP_PID: int | None = None


def _exit_if_orphaned() -> None:
    """A worker whose sweep process is gone ends (nothing would read its outcome)."""
    if _SWEEP_PID is not None and os.getppid() != _SWEEP_PID:
        os._exit(128 + int(signal.SIGTERM))


def _worker_run(data: dict, cwd: str, threads: int) -> dict:
    """:func:`execute_run` in a worker process, stop signals armed: stopped, the run
    records it and its outcome says ``interrupted`` (a worker whose sweep is gone then exits)."""
    started = time.perf_counter()
    try:
        with armed():
            return execute_run(data, cwd, threads)
    except KeyboardInterrupt as exc:
        _exit_if_orphaned()
        return Outcome("interrupted", time.perf_counter() - started, interruption(exc)).__dict__


class RayExecutor:
    """Each run a Ray task asking for the sweep's ``resources``, on the cluster at
    ``address`` or on a local Ray instance started for the sweep (``num_cpus``:
    its size, default all cores) and stopped after it."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus: int | None = None, gpus: float = 0,
                 num_cpus: int | None = None):
        self.address = address
        self.cpus = cpus or 1
        self.gpus = gpus
        self.num_cpus = num_cpus

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k.startswith("VLPROMPT_") or k in PASSED_ENV}

    def run(self, runs: list[Run], on_done: OnDone, progress=None) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'vlprompt[ray]'") from None
        ours = not ray.is_initialized()
        if ours:
            local = {"num_cpus": self.num_cpus} if self.address is None else {}
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     runtime_env={"env_vars": self._env()}, **local)
        try:
            task = ray.remote(execute_run).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)
            cwd = os.getcwd()
            pending = {task.remote(run.data, cwd, self.cpus): run for run in runs}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    run = pending.pop(ref)
                    try:
                        outcome = Outcome(**ray.get(ref))
                    except Exception as exc:  # noqa: BLE001 - the task or its worker died
                        outcome = Outcome("failed", error=f"the Ray task failed: {_first_line(exc)}")
                    on_done(run, outcome)
        finally:
            if ours:
                ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def make_executor(name: str, jobs: int = 1, address: str | None = None, resources: Any = None,
                  ray_cpus: int | None = None) -> Any:
    """The executor ``--executor`` names, sized by the sweep's ``resources``."""
    cpus = getattr(resources, "cpus", None)
    if name == "local":
        if address is not None or ray_cpus is not None:
            raise UserError("--address and --ray-cpus apply to --executor ray")
        return LocalExecutor(jobs, cpus)
    if name == "ray":
        if jobs != 1:
            raise UserError("--jobs applies to --executor local; Ray runs as many runs at once as the cluster holds")
        if address is not None and ray_cpus is not None:
            raise UserError("--ray-cpus sizes a local Ray instance; a cluster given with --address has its own size")
        return RayExecutor(address, cpus, getattr(resources, "gpus", 0), ray_cpus)
    raise UserError(f"--executor: unknown executor {name!r} (local or ray)")
