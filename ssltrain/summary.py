"""summary.json: the headline numbers of a run and how it was made, written by rank 0 at the end of
training; and the run's settings as TensorBoard HParams (so runs compare in a table).

The "median of the last N" headline (`train.median_last`, FixMatch's and USB's convention) is the median
test top-1 over the last N evaluations *of the second half of the run*: a short run with fewer than N
evaluations does not mix in early, still-improving ones. A run whose only evaluations are in its first
half (e.g. stopped early) takes its last evaluation. `median_last_n` and `median_last_steps` say which
evaluations the median took.
"""
from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time

import torch


def best(history: list[list[float]]) -> tuple[int, float]:
    """(step, test top-1) of the best evaluation in `history` (the earliest of equals)."""
    step, top1 = max(history, key=lambda h: (h[1], -h[0]))
    return int(step), top1


def median_window(history: list[list[float]], steps: int, n: int) -> list[list[float]]:
    """The evaluations the median headline takes: the last `n` of the second half of `steps`."""
    late = [h for h in history if h[0] > steps / 2]
    return late[-n:] if late else history[-1:]


def versions() -> dict[str, str]:
    from . import __version__
    return {"ssltrain": __version__, "torch": torch.__version__, "python": platform.python_version()}


def write_summary(trainer) -> dict:
    """The run's summary from its evaluation history; written to `run_dir/summary.json` on rank 0."""
    config, history = trainer.config, trainer.history
    window = median_window(history, config.train.steps, config.train.median_last)
    best_step, best_top1 = best(history)
    rows = (trainer.batch_l + trainer.batch_u) * trainer.dist.world
    summary = {"test_top1": history[-1][1], "best_test_top1": best_top1, "best_step": best_step,
               "median_last_test_top1": statistics.median(t for _, t in window), "median_last_n": len(window),
               "median_last_steps": [int(window[0][0]), int(window[-1][0])],
               "evaluated_model": "ema" if trainer.ema is not None else "online",
               "steps": trainer.step, "wall_seconds": trainer.seconds["wall"], "train_seconds": trainer.seconds["train"],
               "train_samples_per_second": trainer.step * rows / max(trainer.seconds["train"], 1e-9),
               "seed": config.seed, "dataset": config.data.name, "plugins": list(config.plugins),
               "num_labeled": len(trainer.data.labeled_idx), "num_classes": trainer.data.num_classes,
               "processes": trainer.dist.world, "started_at": trainer.started_at,
               "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
               "command": trainer.command or shlex.join(sys.argv), "final_eval": trainer.final_eval}
    if trainer.dist.is_main:
        (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def hparams(config) -> dict[str, float | int | str | bool]:
    """The settings that tell runs apart in TensorBoard's HParams table: the method, data, labels, seed,
    model, budget, and every scalar setting of the enabled plugins ("<plugin>.<key>")."""
    out = {"plugins": "+".join(config.plugins) or "supervised", "dataset": config.data.name,
           "num_labeled": config.data.num_labeled, "seed": config.seed, "model": config.model.name,
           "optim": config.optim.name, "lr": config.optim.lr, "steps": config.train.steps}
    for name in config.plugins:
        section = config.plugin_configs.get(name)
        for key, value in (section.model_dump() if section is not None else {}).items():
            if isinstance(value, (bool, int, float, str)):
                out[f"{name}.{key}"] = value
    return out
