"""Training and evaluation: the only place that knows how a run proceeds.

One file per concern, read top-down:

* :mod:`.run` — :class:`Engine`, the run: which (method, seed) pairs, in what order,
  skipped when done, recorded as they finish; :mod:`.pair` — one pair built, trained
  and scored, with what it cost;
* :mod:`.record` — ``results.json`` and the few-shot samples, kept and moved aside;
* :mod:`.fit` — the training loop of one pair; :mod:`.optim` — what trains and how;
* :mod:`.evaluate` — scoring; :mod:`.batches` — what a method is given;
  :mod:`.extract` — frozen image features, once per run;
* :mod:`.checkpoints` — a pair's prompts and training state;
* :mod:`.context` — what every part shares (device, output, progress, features);
* :mod:`.strategy` — what the loops ask of the processes a run is spread over (split
  batches, sum gradients, let the main process alone write), answered for one process;
  :mod:`.distributed` — the same answered for the processes of ``torchrun``;
  :mod:`.faults` — what happens when a pair, a plug-in or a logger fails.
"""

from .batches import ImageBatches, ViewBatches, forward, make_batch
from .checkpoints import PairFiles, assign_trained, load_checkpoint, save_checkpoint, state_path
from .context import ProgressReporter, RunContext, autocast, resolve_device, resolve_precision, set_seed
from .evaluate import evaluate
from .faults import PairFailed, PluginError, Terminated, exit_code, interruption, log_traceback, stop_signals
from .fit import fit
from .optim import learned_tensors, lr_at, make_optimizer, optimizer_groups, trainable_parameters
from .run import Engine

__all__ = [
    "Engine", "PairFailed", "PluginError", "ProgressReporter", "RunContext", "PairFiles",
    "fit", "evaluate", "forward", "make_batch", "ImageBatches", "ViewBatches",
    "learned_tensors", "lr_at", "make_optimizer", "optimizer_groups", "trainable_parameters",
    "save_checkpoint", "load_checkpoint", "assign_trained", "state_path", "log_traceback",
    "set_seed", "resolve_device", "resolve_precision", "autocast",
    "Terminated", "interruption", "exit_code", "stop_signals",
]
