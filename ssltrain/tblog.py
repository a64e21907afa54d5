"""Run outputs for people watching: TensorBoard events, metrics.jsonl, and console progress."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


def confusion_image(confusion: list[list[int]], cell: int = 16) -> torch.Tensor:
    """A [3, H, W] heat map of the row-normalised confusion matrix (white 0 -> dark blue 1)."""
    m = torch.tensor(confusion, dtype=torch.float32)
    m = m / m.sum(1, keepdim=True).clamp(min=1)
    img = m.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    low, high = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.03, 0.19, 0.42])
    return (low[:, None, None] + (high - low)[:, None, None] * img[None]).clamp(0, 1)


class RunLogger:
    """Writes TensorBoard scalars/images/text under `run_dir/tb` and evaluations to metrics.jsonl."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: str):
        self.run_dir = Path(run_dir)
        # a resumed run drops what a crashed predecessor logged after its checkpoint (steps > start_step)
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.total = total_steps
        self.bar = None
        if progress == "bar" or (progress == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stderr)
        self._t0 = time.perf_counter()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def figure(self, tag: str, figure, step: int) -> None:
        self.writer.add_figure(tag, figure, step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        """Advance the progress bar to `step`, or print one plain line when not on a terminal."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=True)
        else:
            shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(f"step {step}/{self.total} {shown} ({time.perf_counter() - self._t0:.1f}s)", flush=True)

    def evaluation(self, step: int, metrics: dict) -> None:
        """Log an evaluation to TensorBoard and append it to metrics.jsonl."""
        self.scalars({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
        if "confusion" in metrics:
            self.image("eval/confusion_matrix", confusion_image(metrics["confusion"]), step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        line = " ".join(f"{k}={v:.2f}" for k, v in metrics.items() if isinstance(v, float))
        (self.bar.write if self.bar is not None else print)(f"eval step {step}: {line}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


class NullLogger:
    """Stands in for RunLogger on processes other than rank 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass
