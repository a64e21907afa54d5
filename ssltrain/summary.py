"""summary.json: the headline numbers of a run, written by rank 0 at the end of training."""
from __future__ import annotations

import json
import statistics


def write_summary(trainer) -> dict:
    """The run's summary from its evaluation history; written to `run_dir/summary.json` on rank 0."""
    tops = [t for _, t in trainer.history]
    last = tops[-trainer.config.train.median_last:]
    rows = (trainer.batch_l + trainer.batch_u) * trainer.dist.world
    summary = {"test_top1": tops[-1], "best_test_top1": max(tops),
               "median_last_test_top1": statistics.median(last), "median_last_n": len(last),
               "evaluated_model": "ema" if trainer.ema is not None else "online",
               "steps": trainer.step, "wall_seconds": trainer.seconds["wall"], "train_seconds": trainer.seconds["train"],
               "train_samples_per_second": trainer.step * rows / max(trainer.seconds["train"], 1e-9),
               "plugins": list(trainer.config.plugins), "num_labeled": len(trainer.data.labeled_idx),
               "processes": trainer.dist.world, "final_eval": trainer.final_eval}
    if trainer.dist.is_main:
        (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
