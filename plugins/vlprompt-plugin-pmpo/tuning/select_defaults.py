"""Choose PMPO's default options by validation accuracy on the embedded world — never
the test split.

Protocol ``pseudo_novel`` (registered here, in-process): the few-shot sample is drawn
as for base-to-novel; only the base half of the classes is used, itself split into a
pseudo-base half (trained on) and a pseudo-novel half (never trained on); both are
scored on the dataset's **validation** split, and H of the two is the selection score
(generalisation to unseen classes, as base-to-novel measures it, without touching test).

One option is varied at a time from a starting point (coordinate search); every
result is written to ``results.json`` beside this script.

    HF_HUB_OFFLINE=1 python plugins/vlprompt-plugin-pmpo/tuning/select_defaults.py \
        --dataset embedded_objects --seeds 1 2 --out /tmp/pmpo-tuning
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from vlprompt_core import hookimpl
from vlprompt_core.api import ClassSet, EvalSet, Plan, ProtocolEntry
from vlprompt_core.builtin.protocols import FewShotOptions, _sample, _shots, harmonic_mean, subsample
from vlprompt_core.engine import Engine
from vlprompt_core.plugins import build_registry, make_plugin_manager
from vlprompt_core.spec import check_spec, validate_spec

HERE = Path(__file__).resolve().parent


def pseudo_novel_plan(opts: FewShotOptions, ctx) -> Plan:
    ds = ctx.dataset
    train, val = _shots(ctx, opts.shots)
    n_base = math.ceil(len(ds.classes) / 2)
    pseudo_base = list(range(math.ceil(n_base / 2)))
    pseudo_novel = list(range(len(pseudo_base), n_base))

    def classes(labels):
        return ClassSet([ds.classes.names[i] for i in labels], ds.classes.templates, ds.classes.ensemble) \
            if hasattr(ds.classes, "ensemble") else ClassSet([ds.classes.names[i] for i in labels], ds.classes.templates)

    return Plan(subsample(train, pseudo_base), [], classes(pseudo_base), [
        EvalSet("val_base", subsample(ds.val, pseudo_base), classes(pseudo_base)),
        EvalSet("val_novel", subsample(ds.val, pseudo_novel), classes(pseudo_novel)),
    ], _sample(train, val))


class TuningProtocol:
    @hookimpl
    def vlprompt_protocols(self):
        return [ProtocolEntry(
            "pseudo_novel", FewShotOptions, pseudo_novel_plan,
            lambda o, a: {"val_base": a["val_base"], "val_novel": a["val_novel"],
                          "H": harmonic_mean(a["val_base"], a["val_novel"])},
            "tuning only: base classes split into seen and unseen halves, scored on validation")]


START = {"n_prompts": 2, "n_ctx": 2, "ctx_init": "", "insertion": "every_block", "coupling": "per_prompt",
         "combine": "mean_logits", "prior": "ensemble", "prior_weight": 0.2}
AXES = [
    ("n_prompts", [1, 2, 4]),
    ("insertion", ["group_start", "every_block"]),
    ("combine", ["mean_logits", "mean_features", "mean_probs"]),
    ("prior", ["none", "ensemble", "loss", "both"]),
    ("prior_weight", [0.1, 0.2, 0.4]),
    ("ctx_init", ["", "a photo of a"]),
    ("coupling", ["per_prompt", "shared"]),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="embedded_objects")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=Path("/tmp/pmpo-tuning"))
    args = p.parse_args()
    reg = build_registry(*make_plugin_manager(extra=(("pmpo-tuning", TuningProtocol()),)))
    results_path = HERE / "results.json"
    record = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    best = dict(START)

    def score(options) -> float:
        key = json.dumps({"dataset": args.dataset, "shots": args.shots, "epochs": args.epochs,
                          "seeds": args.seeds, "options": options}, sort_keys=True)
        if key not in record["runs"]:
            spec = validate_spec({
                "method": {"name": "pmpo", **options},
                "dataset": {"name": args.dataset},
                "protocol": {"name": "pseudo_novel", "shots": args.shots},
                "train": {"epochs": args.epochs, "batch_size": 32, "lr": 0.0035, "crop_scale": [0.8, 1.0],
                          "seeds": args.seeds, "device": "cpu"},
                "output": str(args.out / f"run{len(record['runs'])}"),
            }, reg)
            check_spec(spec, reg)
            t0 = time.time()
            summary = Engine(spec, reg).run()["summary"]["pmpo"]
            record["runs"][key] = {"options": options, "summary": summary, "seconds": time.time() - t0}
            results_path.write_text(json.dumps(record, indent=2) + "\n")
        s = record["runs"][key]["summary"]
        print(f"  H {s['H']['mean']:6.2f}  (val base {s['val_base']['mean']:.2f}, unseen {s['val_novel']['mean']:.2f})"
              f"  {options}", flush=True)
        return s["H"]["mean"]

    for name, values in AXES:
        print(f"{name}:", flush=True)
        scored = {v: score({**best, name: v}) for v in values}
        best[name] = max(scored, key=scored.get)
    record["chosen"] = {"dataset": args.dataset, "options": best}
    results_path.write_text(json.dumps(record, indent=2) + "\n")
    print("chosen:", best)


if __name__ == "__main__":
    main()
