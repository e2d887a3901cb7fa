"""One run over several processes (torch.distributed, gloo on the CPU): two processes
train what one process trains, the main process alone writes, a killed run resumes
with another process count, and the text pass sharded over classes is the whole pass.

The two-process checks share one gloo group of two processes, started once for the
module with ``torch.multiprocessing`` (:func:`_two_processes`: the text pass, then the
runs in turn); the one-process runs join a gloo group of the test process alone
(:func:`one_process_group`). ``vlprompt run --nproc 2`` goes through ``torchrun`` itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from vlprompt_core import hookimpl
from vlprompt_core.api import MethodEntry
from vlprompt_core.data.loader import ShuffledBatches, contiguous_part, epoch_key, image_seed
from vlprompt_core.engine.distributed import Strategy

# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, processes: int, *args) -> None:
    """``target(rank, processes, port, *args)`` in ``processes`` fresh processes, each in
    a gloo group with the others; an error (or a kill) in one stops them all and raises."""
    import torch.multiprocessing as mp

    mp.start_processes(target, args=(processes, free_port(), *args), nprocs=processes, join=True,
                       start_method="spawn")


def _join(rank: int, processes: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=processes)


@contextlib.contextmanager
def one_process_group(store: Path):
    """A gloo group of this (the test) process alone, ``store`` a new file for its
    rendezvous; left on the way out. The engine runs in it as one process of a distributed
    run (a seed per image, the collectives)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class CoOpBothWays:
    """A plug-in with CoOp (its recipe too) twice: ``coop_sharded`` lets a distributed run
    shard its text pass over classes, ``coop_whole`` does not (whatever CoOp itself says)."""

    @hookimpl
    def vlprompt_methods(self):
        from vlprompt_plugin_coop import RECIPE, CoOp, CoOpOptions

        class ShardedCoOp(CoOp):
            shards_classes = True

        class WholeCoOp(CoOp):
            shards_classes = False

        return [MethodEntry("coop_sharded", CoOpOptions, ShardedCoOp, "CoOp, its text pass sharded", RECIPE),
                MethodEntry("coop_whole", CoOpOptions, WholeCoOp, "CoOp, its text pass whole", RECIPE)]


def _registry(specs: str):
    from vlprompt_core.plugins import build_registry, make_plugin_manager

    os.environ["VLPROMPT_DATASETS_SPEC"] = specs
    return build_registry(*make_plugin_manager(extra=(("coop both ways", CoOpBothWays()),)))


def _run_in_group(rank: int, data: dict, specs: str, report: Path, kill_after_saves: int | None = None) -> None:
    """This process's part of a run of ``data`` (its group already joined): what it wrote
    (renamed into place), whether it took the folder's lock and its log lines go to
    ``report``-<rank>.json. With ``kill_after_saves``, the main process writes
    ``report``-dying and kills itself (SIGKILL) right after writing its n-th training state."""
    import vlprompt_core.engine.checkpoints as checkpoints
    from vlprompt_core.engine import Engine
    from vlprompt_core.lock import FolderLock
    from vlprompt_core.spec import validate_spec

    seen: dict = {"writes": [], "locked": False, "logs": []}
    replace, enter, save = os.replace, FolderLock.__enter__, checkpoints.save_state

    def recorded_replace(src, dst, *args, **kwargs):
        seen["writes"].append(str(dst))
        return replace(src, dst, *args, **kwargs)

    def recorded_enter(self):
        seen["locked"] = True
        return enter(self)

    saves = []

    def save_then_die(*args):
        save(*args)
        saves.append(1)
        if len(saves) == kill_after_saves:
            Path(f"{report}-dying").touch()
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace, FolderLock.__enter__ = recorded_replace, recorded_enter
    if kill_after_saves is not None and rank == 0:
        checkpoints.save_state = save_then_die
    try:
        reg = _registry(specs)
        Engine(validate_spec(data, reg), reg, log=seen["logs"].append).run()
    finally:
        os.replace, FolderLock.__enter__, checkpoints.save_state = replace, enter, save
        Path(f"{report}-{rank}.json").write_text(json.dumps(seen))


def spec(world, output: Path, methods, **train) -> dict:
    return {
        "backbone": {"name": "open_clip", "model": str(world["config"]), "pretrained": None},
        "method": methods,
        "dataset": {"name": "toy", "root": str(world["data"])},
        "protocol": {"name": "few_shot", "shots": 2},
        # 12 training images in batches of 5: shares of 3 and 2 images in two processes;
        # 18 test images in batches of 4: 3 and 2 batches
        "train": {"epochs": 2, "batch_size": 5, "eval_batch_size": 4, "seeds": [1], "device": "cpu",
                  "precision": "fp32", "lr": 0.01, **train},
        "output": str(output),
    }


METHODS = [
    {"name": "coop_whole", "n_ctx": 2},
    {"name": "coop_sharded", "n_ctx": 2},
    {"name": "cocoop", "n_ctx": 2, "ctx_init": ""},
    {"name": "vpt_deep", "n_ctx": 2},
    {"name": "coop", "n_ctx": 2, "label": "coop_views", "train": {"augment_views": 2}},
]


#: the methods of the run that is killed and resumed
KILLED = [METHODS[1], METHODS[3]]


def _two_processes(rank: int, processes: int, port: int, world: dict, tmp: str) -> None:
    """One of the module's group of two processes: in turn the text pass whole and
    sharded (into ``tmp``/text-<rank>.json), the run ``two`` of :data:`METHODS`, and the
    run ``killed`` of :data:`KILLED` (a training state every step) whose main process
    kills itself right after its third training state. That ends the group: it comes last."""
    import torch.distributed as dist

    _join(rank, processes, port)
    tmp = Path(tmp)
    _text_pass(rank, world["root"], tmp / "text")
    _run_in_group(rank, spec(world, tmp / "two", METHODS), str(world["specs"]), tmp / "two-report")
    _run_in_group(rank, spec(world, tmp / "killed", KILLED, checkpoint_every=1), str(world["specs"]),
                  tmp / "killed-report", kill_after_saves=3)
    dist.destroy_process_group()


def run_here(world, out: Path, methods, logs: list | None = None, **train) -> Path:
    """A run of ``methods`` into ``out`` in this process (distributed inside
    :func:`one_process_group`, plain outside); its folder. Log lines to ``logs``."""
    from vlprompt_core.engine import Engine
    from vlprompt_core.spec import validate_spec

    reg = _registry(str(world["specs"]))
    Engine(validate_spec(spec(world, out, methods, **train), reg), reg,
           log=(logs if logs is not None else []).append).run()
    return out


def report(tmp: Path, name: str, rank: int) -> dict:
    return json.loads((tmp / f"{name}-report-{rank}.json").read_text())


def outcome(folder: Path) -> dict:
    """``label -> (accuracy, trained tensors, epoch losses)`` of a finished run."""
    record = json.loads((folder / "results.json").read_text())
    assert record["status"] == "complete", record.get("failures")
    return {r["method"]: (r["accuracy"], load_file(str(folder / r["checkpoint"])), [e["loss"] for e in r["epochs"]])
            for r in record["runs"]}


def assert_same_training(mine: dict, ref: dict, labels) -> None:
    for label in labels:
        (acc, tensors, losses), (ref_acc, ref_tensors, ref_losses) = mine[label], ref[label]
        assert acc == ref_acc, label
        assert tensors.keys() == ref_tensors.keys()
        for name in tensors:
            assert (tensors[name] - ref_tensors[name]).abs().max().item() <= 1e-5, (label, name)
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), label


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """The module's group of two processes (:func:`_two_processes`), then the spec of
    ``two`` in one process (distributed) and its ``augment_views`` method in a plain run
    (no process group). The folder, the outcomes of ``two``, ``one`` and ``plain``, and
    the error that ended the group (its main process killed in ``killed``; None if not)."""
    from torch.multiprocessing.spawn import ProcessException

    tmp = tmp_path_factory.mktemp("dist")
    ended = None
    try:
        spawn(_two_processes, 2, world, str(tmp))
    except ProcessException as exc:
        if not (tmp / "killed-report-dying").exists():
            raise  # not the kill planned: a check failed or a process crashed before it
        ended = exc
    with one_process_group(tmp / "one-store"):
        one = run_here(world, tmp / "one", METHODS)
    plain = run_here(world, tmp / "plain", METHODS[-1:])
    return tmp, outcome(tmp / "two"), outcome(one), outcome(plain), ended


# ------------------------------------------------------------------ two processes train as one


def test_two_processes_train_what_one_process_trains(runs):
    _, two, one, _, _ = runs
    assert_same_training(two, one, [m.get("label", m["name"]) for m in METHODS])
    for label, (_, tensors, _) in two.items():  # and they trained
        assert all(torch.isfinite(t).all() for t in tensors.values()), label


def test_the_sharded_text_pass_trains_as_the_whole_pass(runs):
    _, two, _, _, _ = runs
    (acc, tensors, losses), (ref_acc, ref_tensors, ref_losses) = two["coop_sharded"], two["coop_whole"]
    assert acc == ref_acc and losses == pytest.approx(ref_losses, rel=1e-5)
    assert (tensors["ctx"] - ref_tensors["ctx"]).abs().max().item() <= 1e-5


def test_augment_views_in_two_processes_is_the_plain_run(runs):
    """Where a run draws no augmentation per image (``augment_views``: the views are drawn
    per view, the order and view choice by the data generator) two processes train what
    a plain run in one process (no process group) trains."""
    _, two, _, plain, _ = runs
    assert_same_training(two, plain, ["coop_views"])


def test_only_the_main_process_writes_and_logs(runs):
    tmp, *_ = runs
    main, other = report(tmp, "two", 0), report(tmp, "two", 1)
    assert main["locked"] and not other["locked"]
    assert other["writes"] == [] and other["logs"] == []
    written = {Path(p).name for p in main["writes"]}
    assert "results.json" in written and any(name.endswith(".safetensors") for name in written)
    record = json.loads((tmp / "two" / "results.json").read_text())
    assert record["processes"] == 2 and all(r["cost"]["processes"] == 2 for r in record["runs"])
    logs = main["logs"]
    assert sum(line.startswith("distributed: 2 process(es) (gloo)") for line in logs) == 1
    sharded = [line for line in logs if line.startswith("coop_sharded: data parallel")]
    assert sharded == ["coop_sharded: data parallel over 2 processes; text pass: each process encodes its share "
                       "of the classes"]
    for label in ("coop_whole", "cocoop"):
        assert sum(f"{label}: data parallel over 2 processes; text pass: not sharded, every process runs it whole"
                   in line for line in logs) == 1


def test_a_killed_two_process_run_resumes_in_one_process(world, runs):
    """Killed (SIGKILL, the main process) right after its third training state, in the
    middle of an epoch: the same spec in one process continues from that state and ends
    where the uninterrupted two-process run ended."""
    tmp, two, _, _, ended = runs
    assert ended is not None, "the two processes of run 'killed' ended without the kill"
    states = list((tmp / "killed" / "checkpoints").glob("*.state.safetensors"))
    assert len(states) == 1
    logs: list[str] = []
    with one_process_group(tmp / "resumed-store"):
        resumed = run_here(world, tmp / "killed", KILLED, logs, checkpoint_every=1)
    assert any("resuming after step 1 of epoch 2 of 2" in line for line in logs), logs
    assert_same_training(outcome(resumed), two, ["coop_sharded", "vpt_deep"])


# ------------------------------------------------------------------ the sharded text pass


def _text_pass(rank: int, root: Path, report: Path) -> None:
    """The text pass of 5 classes, whole and sharded over the processes (shared context,
    class-specific context; in one pass and in chunks of 2): the largest differences of
    the features and of the context's gradient (each process's loss weighted by a share,
    the gradients summed, as the engine does) into ``report``-<rank>.json (its group joined)."""
    from vlprompt_core.engine.distributed import Distributed
    from vlprompt_core.errors import UserError
    from vlprompt_core.prompting import PromptTable, PromptTemplate, sharded_over_classes, text_chunking
    from vlprompt_core.testing import tiny_backbone

    strategy = Distributed()
    backbone = tiny_backbone(Path(root)).requires_grad_(False)
    names = ["red", "green", "blue", "yellow", "purple"]
    table = PromptTable(backbone, names, PromptTemplate.with_context(3))
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(len(names), backbone.embed_dim, generator=g)
    share = [0.7, 0.3][rank]  # any shares summing to 1
    out: dict = {}
    for case, lead in (("shared", ()), ("per class", (len(names),))):
        start = 0.02 * torch.randn(*lead, 3, backbone.text_width, generator=g)
        for chunk in (0, 2):
            with text_chunking(chunk):
                ctx = start.clone().requires_grad_(True)
                whole = table.encode(backbone, ctx)
                (whole * weight).sum().backward()
                ctx_sharded = start.clone().requires_grad_(True)
                with sharded_over_classes(strategy):
                    sharded = table.encode(backbone, ctx_sharded)
                (share * (sharded * weight).sum()).backward()
                strategy.all_reduce_grads({"ctx": ctx_sharded})
            out[f"{case}, chunks {chunk}"] = [(sharded - whole).abs().max().item(),
                                              (ctx_sharded.grad - ctx.grad).abs().max().item(),
                                              ctx.grad.abs().max().item()]
    try:
        strategy.check_batches(1)
        out["refused"] = None
    except UserError as exc:
        out["refused"] = str(exc)
    Path(f"{report}-{rank}.json").write_text(json.dumps(out))


def test_the_class_sharded_text_pass_equals_the_whole_pass(runs):
    tmp, *_ = runs
    for rank in range(2):
        found = json.loads((tmp / f"text-{rank}.json").read_text())
        assert "cannot be shared by 2 processes" in found.pop("refused")
        for case, (features, grad, scale) in found.items():
            assert features <= 1e-5, case
            assert grad <= 1e-5 * scale and scale > 1e-3, case  # float rounding of sums of about 350


# ------------------------------------------------------------------ shares and seeds (no processes)


@given(st.integers(0, 200), st.integers(1, 9))
def test_contiguous_parts_cover_everything_once_in_order(n, processes):
    parts = [contiguous_part(n, r, processes) for r in range(processes)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    sizes = [len(range(n)[p]) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_every_process_draws_the_global_batches_and_seeds_whatever_the_count():
    def epochs(processes):
        out = []
        gens = [torch.Generator().manual_seed(3) for _ in range(processes)]
        samplers = [ShuffledBatches(11, 4, g, (r, processes)) for r, g in enumerate(gens)]
        for _ in range(2):
            shares = [list(s) for s in samplers]
            out.append([sum((share[b] for share in shares), []) for b in range(len(samplers[0]))])
        return out

    one, three = epochs(1), epochs(3)
    assert one == three
    plain = ShuffledBatches(11, 4, torch.Generator().manual_seed(3))
    assert [[i for i, _ in batch] for batch in one[0]] == list(plain)  # the same order as a plain run
    assert one[0] != one[1]  # fresh seeds every epoch
    key = epoch_key(torch.Generator().manual_seed(3))
    assert one[0][0][0][1] == image_seed(key, one[0][0][0][0])


def test_an_image_draws_its_augmentation_from_its_own_seed_whoever_reads_it(world):
    from vlprompt_core.api import Item
    from vlprompt_core.data import train_transform
    from vlprompt_core.data.images import ImageDataset
    from vlprompt_core.data.loader import SeededImages

    images = sorted((world["data"] / "toy" / "images").glob("*.png"))[:3]
    dataset = SeededImages(ImageDataset([Item(p, 0) for p in images], train_transform(16, [0.5] * 3, [0.5] * 3)))
    first = dataset[(2, 99)][0]
    torch.manual_seed(5)
    state = torch.get_rng_state()
    _ = dataset[(0, 7)], dataset[(1, 8)]
    assert torch.equal(dataset[(2, 99)][0], first)  # what was read before does not matter
    assert torch.equal(torch.get_rng_state(), state)  # torch's own stream is left alone
    assert not torch.equal(dataset[(2, 100)][0], first)


def test_the_single_process_strategy_changes_nothing():
    s = Strategy()
    loss = torch.tensor(1.5, requires_grad=True)
    step = s.global_loss(loss, 4)
    assert (step.images, step.total) == (4, 6.0) and s.local_loss(loss, 4, step) is loss
    t = torch.ones(3)
    assert s.gather_rows(t, t.device) is t and s.sum([1, 2.5]) == [1, 2.5] and s.first("x") == "x"
    assert s.part(7) == slice(0, 7) and s.blocks(10, 4) == slice(0, 10) and s.share is None
    assert s.from_main(lambda: 3) == 3 and s.is_main and not s.distributed


# ------------------------------------------------------------------ the command


@pytest.mark.slow  # torchrun and two processes of `vlprompt run`
def test_vlprompt_run_nproc_launches_torchrun(world, tmp_path, capfd):
    """``vlprompt run --nproc 2`` (called in this process: what it launches are the
    processes that matter) starts torchrun, whose two processes run the spec together; what
    they print goes to this process's stdout and stderr (file descriptors 1 and 2)."""
    from test_cli import vlprompt

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec(world, tmp_path / "out", [{"name": "coop", "n_ctx": 2}], epochs=1)))
    capfd.readouterr()
    done = vlprompt("run", str(spec_file), "--nproc", "2", env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])})
    launched = capfd.readouterr()
    stdout, stderr = done.stdout + launched.out, done.stderr + launched.err
    assert done.returncode == 0, stderr
    assert "distributed: 2 process(es) (gloo)" in stderr
    assert "coop" in stdout and "results:" in stdout
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["status"] == "complete" and record["processes"] == 2
    assert not list((tmp_path / "out" / "checkpoints").glob("*.state.safetensors"))


def test_vlprompt_run_nproc_refuses_batches_too_small_to_share_before_launching(world, tmp_path):
    from test_cli import vlprompt

    spec_file = tmp_path / "spec.yaml"
    data = spec(world, tmp_path / "out", [{"name": "coop", "n_ctx": 2}], epochs=1)
    spec_file.write_text(yaml.safe_dump(data))
    batch = data["train"]["batch_size"]
    done = vlprompt("run", str(spec_file), "--nproc", str(batch + 1),
                    env_extra={"VLPROMPT_DATASETS_SPEC": str(world["specs"])})
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --nproc {batch + 1}: a batch of {batch} image(s) cannot be shared by {batch + 1} "
                      f"processes (each needs at least one); use a batch size of at least {batch + 1}, or fewer "
                      "processes"]
    assert not (tmp_path / "out").exists()  # nothing launched

