"""Test helpers for plugin authors, shipped as a pytest plugin (entry point `pytest11`).

Fixtures:
    ssl_config(*overrides, plugins=[...], classes={...}) -> RunConfig   a tiny validated config
    ssl_run(plugins=[...], classes={...}, steps=10, overrides=[...]) -> TinyRun
        trains the tiny config (two moons, 8 labels, a 16-unit MLP: well under a second on a CPU)

`classes` adds plugin classes that are not installed (e.g. defined in the test module) to the
installed ones. A TinyRun gives the summary, TensorBoard scalars, the checkpoint, the plugin
instances, and `resume(steps)` to check that plugin state survives a checkpoint round trip.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from . import checkpoint
from .loop import Trainer
from .plugins import discover
from .tblog import read_tensorboard, scalar_values
from .tiny import tiny_config


@dataclass
class TinyRun:
    run_dir: Path
    summary: dict
    trainer: Trainer
    classes: dict

    def plugin(self, name: str):
        """The active plugin instance registered as `name`."""
        return self.trainer.pm.get_plugin(name)

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        """(step, value) pairs logged to TensorBoard under `tag`, e.g. "myplugin/diag"; a loss term's name
        "myplugin/term" also finds its tag "loss/myplugin/term"."""
        events = read_tensorboard(self.run_dir / "tb")
        tags = events.PluginTagToContent("scalars")
        return scalar_values(events, tag if tag in tags or f"loss/{tag}" not in tags else f"loss/{tag}")

    def checkpoint(self) -> dict:
        return checkpoint.load(self.run_dir / "checkpoints" / "last.pt")

    def resume(self, steps: int) -> "TinyRun":
        """Continue this run to `steps` in a fresh Trainer built from the checkpoint."""
        config = self.trainer.config.model_copy(deep=True)
        config.train.steps = steps
        trainer = Trainer(config, self.run_dir, self.classes)
        trainer.load_state_dict(self.checkpoint())
        return TinyRun(self.run_dir, trainer.fit(), trainer, self.classes)


def run_tiny(run_dir: Path, plugins: list[str], classes: dict | None = None, steps: int = 10,
             overrides: tuple[str, ...] = ()) -> TinyRun:
    """Train the tiny config with `plugins` enabled for `steps` steps into `run_dir`."""
    classes = {**discover(), **(classes or {})}
    config = tiny_config(f"train.steps={steps}", *overrides, classes=classes, plugins=list(plugins))
    trainer = Trainer(config, run_dir, classes)
    return TinyRun(Path(run_dir), trainer.fit(), trainer, classes)


@pytest.fixture
def ssl_config():
    """Factory for tiny validated configs: ssl_config("train.steps=5", plugins=["mine"])."""
    return tiny_config


@pytest.fixture
def ssl_run(tmp_path):
    """Factory that trains a tiny run: ssl_run(plugins=["mine"], classes={"mine": Mine}, steps=10)."""
    count = iter(range(1_000_000))

    def run(plugins, classes=None, steps=10, overrides=()):
        return run_tiny(tmp_path / f"run{next(count)}", plugins, classes, steps, tuple(overrides))
    return run
