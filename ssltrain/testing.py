"""Test helpers for plugin authors, shipped as a pytest plugin (entry point `pytest11`).

Fixtures (both factories; `overrides` are `dotted.key=value` strings as for `--set`, `sections` replace
top-level config keys, e.g. `mine={"weight": 2}`, and `classes` adds plugin classes that are not
installed, e.g. defined in the test module, to the installed ones):

    ssl_config(plugins=(), classes=None, overrides=(), **sections) -> RunConfig
        the tiny validated config (two moons, 8 labels, a 16-unit MLP, 20 steps)
    ssl_run(plugins=(), classes=None, steps=10, overrides=(), **sections) -> TinyRun
        trains it for `steps` steps (well under a second on a CPU) in a fresh directory

A `TinyRun` gives the summary, the TensorBoard scalars, the checkpoint, the plugin instances,
`resume(steps)` to continue the run, and `assert_resumes_exactly(at)`, which fails unless a run
interrupted after `at` steps and resumed ends bit-identical to the uninterrupted one.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from . import checkpoint
from .errors import Interrupted
from .hookspecs import hookimpl
from .loop import Trainer
from .plugins import discover
from .tblog import read_tensorboard, scalar_values
from .tiny import check_lists, tiny_config

#: Scalars and checkpoint entries that measure time, not training: left out of the exactness check.
TIMING_TAGS = ("train/steps_per_second", "train/samples_per_second")
TIMING_STATE = ("seconds", "started_at")


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run directory: tag -> [(step, value), ...]."""
    events = read_tensorboard(Path(run_dir) / "tb")
    return {tag: scalar_values(events, tag) for tag in events.PluginTagToContent("scalars")}


class _InterruptAfter:
    """Requests a stop after step `at`, as SIGTERM would: the loop writes a checkpoint and raises Interrupted."""

    def __init__(self, trainer: Trainer, at: int):
        self.trainer, self.at = trainer, at

    @hookimpl
    def ssl_step_end(self, ctx):
        if ctx.step + 1 == self.at:
            self.trainer.stop.requested = True


@dataclass
class TinyRun:
    """A finished tiny run: its directory, `summary.json` as a dict, the Trainer (model, config, plugin
    manager) and the plugin classes it was built with."""

    run_dir: Path
    summary: dict
    trainer: Trainer
    classes: dict

    def plugin(self, name: str):
        """The active plugin instance registered as `name`."""
        return self.trainer.pm.get_plugin(name)

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        """(step, value) pairs logged to TensorBoard under `tag`, e.g. "myplugin/diag" (steps are 1-based); a
        loss term's name "myplugin/term" also finds its tag "loss/myplugin/term"."""
        scalars = read_scalars(self.run_dir)
        return scalars.get(tag, scalars.get(f"loss/{tag}", []))

    def checkpoint(self) -> dict:
        """The run's checkpoints/last.pt, loaded on the CPU."""
        return checkpoint.load(self.run_dir / "checkpoints" / "last.pt")

    def resume(self, steps: int) -> "TinyRun":
        """Continue this run from its checkpoint to `steps` in a fresh Trainer (fresh plugin instances),
        as `ssltrain train --resume --set train.steps=STEPS` does. It checks nothing about the
        continuation: `assert_resumes_exactly` does."""
        config = self.trainer.config.model_copy(deep=True)
        config.train.steps = steps
        trainer = Trainer(config, self.run_dir, self.classes)
        trainer.load_state_dict(self.checkpoint())
        return TinyRun(self.run_dir, trainer.fit(), trainer, self.classes)

    def assert_resumes_exactly(self, at: int | None = None) -> None:
        """Assert that this run, interrupted after step `at` (default: half its steps) and resumed, ends
        bit-identical to itself uninterrupted. Call it on a run from `ssl_run`, not from `resume`.

        Trains the same config again, stops it after step `at` as SIGTERM would (a checkpoint is written),
        resumes it in a fresh Trainer with fresh plugin instances and compares: every tensor and number of
        the final trainer state (model, EMA, optimizer, scheduler, grad scaler, RNG, evaluation history,
        each plugin's `ssl_state_dict`) must be equal, and so must every TensorBoard scalar (loss terms,
        `ssl_metrics`, evaluations; timings aside) logged after `at` whose window starts at or after `at`.
        Raises AssertionError listing what differs.
        """
        config, steps = self.trainer.config, self.trainer.config.train.steps
        at = steps // 2 if at is None else at
        if not 0 < at < steps:
            raise ValueError(f"at={at}: interrupt between step 1 and step {steps - 1} of this {steps}-step run")
        run_dir = self.run_dir.with_name(f"{self.run_dir.name}-interrupted-at-{at}")
        interrupted = Trainer(config, run_dir, self.classes)
        interrupted.pm.register(_InterruptAfter(interrupted, at), name="ssltrain.testing.interrupt")
        try:
            interrupted.fit()
            raise AssertionError(f"the run was not interrupted at step {at}")
        except Interrupted:
            pass
        resumed = Trainer(config, run_dir, self.classes)
        resumed.load_state_dict(checkpoint.load(run_dir / "checkpoints" / "last.pt"))
        resumed.fit()
        differences = _scalar_differences(read_scalars(self.run_dir), read_scalars(run_dir), at)
        differences += _differences(*({k: v for k, v in trainer.state_dict().items() if k not in TIMING_STATE}
                                      for trainer in (self.trainer, resumed)))
        assert not differences, (
            f"interrupted after step {at} and resumed, the run does not continue exactly; differing from the "
            f"uninterrupted run ({len(differences)}): {', '.join(differences[:12])}. Save all state that later "
            f"steps depend on in ssl_state_dict and restore it in ssl_load_state_dict, and draw random numbers "
            f"from torch's generators (their state is checkpointed)")


def _differences(a, b, path: str = "") -> list[str]:
    """Paths at which two nested states (dicts, lists, tensors, numbers, strings) are not identical."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            out += _differences(a[key], b[key], where) if key in a and key in b else [f"{where} (missing in one)"]
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    else:
        same = type(a) is type(b) and a == b
    return [] if same else [path]


def _scalar_differences(reference: dict, resumed: dict, at: int) -> list[str]:
    """Scalars logged after `at` whose logging window (since the tag's previous point) lies after `at`
    and differ, earliest first."""
    out = []
    for tag, points in reference.items():
        got = dict(resumed.get(tag, []))
        for (prev, _), (step, value) in zip([(0, None), *points], points):
            if tag not in TIMING_TAGS and prev >= at and got.get(step) != value:
                out.append((step, f"scalar {tag!r} at step {step} ({value} uninterrupted, {got.get(step)} resumed)"))
    return [text for _, text in sorted(out)]


def run_tiny(run_dir: Path, plugins=(), classes: dict | None = None, steps: int = 10, overrides=(),
             **sections) -> TinyRun:
    """Train the tiny config with `plugins` enabled for `steps` steps into `run_dir`."""
    check_lists(plugins, overrides)
    classes = {**discover(), **(classes or {})}
    config = tiny_config(plugins, classes, [f"train.steps={steps}", *overrides], **sections)
    trainer = Trainer(config, run_dir, classes)
    return TinyRun(Path(run_dir), trainer.fit(), trainer, classes)


@pytest.fixture
def ssl_config():
    """Factory for the tiny validated config: ssl_config(plugins=["mine"], overrides=["mine.weight=2"])."""
    return tiny_config


@pytest.fixture
def ssl_run(tmp_path):
    """Factory that trains a tiny run in a fresh directory:
    ssl_run(plugins=["mine"], classes={"mine": Mine}, steps=10, overrides=["train.log_every=2"])."""
    count = itertools.count()

    def run(plugins=(), classes=None, steps=10, overrides=(), **sections) -> TinyRun:
        return run_tiny(tmp_path / f"run{next(count)}", plugins, classes, steps, overrides, **sections)
    return run
