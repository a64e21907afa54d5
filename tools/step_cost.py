"""Per-step cost of methods relative to a reference method, on one config's data, model and batch sizes.

    python tools/step_cost.py configs/fixmatch_fashion_mnist.yaml \
        --methods fixmatch flexmatch freematch softmatch uda pseudo_label fixmatch,ns3l fixmatch,ds3l \
        [--steps 5] [--warmup 2] [--rounds 5] [--set KEY=VALUE ...] [--json out.json]

Each method (a comma-separated plugin list; "supervised" for none) trains `warmup + steps` steps of the config
with `plugins` replaced, in turns (method 1, method 2, ..., then again for each round) so that a busy machine
slows them alike. Prints the median step time, steps/s and the ratio to the first method: the median over rounds
of the ratio within a round (robust to the load of a shared machine drifting between rounds). Plugin sections of the
config stay in effect for the plugins that are active; the others' defaults apply. Evaluation and checkpoints
are pushed past the timed steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import Clock, StepClock  # noqa: E402

from ssltrain.config import apply_overrides, load_yaml, resolve  # noqa: E402
from ssltrain.loop import Trainer  # noqa: E402
from ssltrain.plugins import discover, schemas  # noqa: E402


def plugins_of(method: str) -> list[str]:
    return [] if method == "supervised" else method.split(",")


def step_times(raw: dict, method: str, args, classes: dict) -> list[float]:
    """Seconds of each timed step of `method` on the config `raw`."""
    total = args.warmup + args.steps
    sets = [*args.set, f"plugins={plugins_of(method) + ['clock']}", f"train.steps={total}",
            f"train.eval_every={total + 1}", f"train.log_every={total + 1}", "train.progress=lines"]
    config = resolve(apply_overrides(raw, sets), schemas(classes))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, classes)
        clock = trainer.pm.get_plugin("clock").clock = Clock(trainer.device)
        clock.mark()
        trainer.fit()
    return clock.intervals()[args.warmup:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--methods", nargs="+", required=True, help="plugin lists, comma-separated; 'supervised': none")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    raw = load_yaml(args.config)
    classes = {**discover(), "clock": StepClock}
    rounds: list[dict[str, float]] = []  # per round: method -> median step time
    for _ in range(args.rounds):
        rounds.append({m: statistics.median(step_times(raw, m, args, classes)) for m in args.methods})
    reference = args.methods[0]
    rows = []
    print(f"{args.config}: {args.rounds} rounds of {args.steps} steps per method; ratio: median over rounds of the "
          f"step time / {reference}'s in the same round")
    for method in args.methods:
        t = statistics.median(r[method] for r in rounds)
        ratio = statistics.median(r[method] / r[reference] for r in rounds)
        rows.append({"method": method, "step_s": t, "steps_per_s": 1 / t, "ratio": ratio})
        print(f"{method:24s} {t * 1000:9.1f} ms/step  {1 / t:7.2f} steps/s  x{ratio:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "sets": args.set, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
