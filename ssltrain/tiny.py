"""The tiny run (two moons, 8 labels, a 16-unit MLP: well under a second on a CPU) that tests, tools and plugin
authors build on; importable without pytest (`ssltrain.testing` wraps it in fixtures)."""
from __future__ import annotations

import copy

from .config import RunConfig, apply_overrides, resolve
from .plugins import discover, schemas

TINY = {
    "seed": 0,
    "plugins": [],
    "data": {"name": "two_moons", "options": {"n_train": 200, "n_test": 200, "noise": 0.1},
             "num_labeled": 8, "batch_size": 16, "unlabeled_batch_size": 32, "augment": {"noise_std": 0.1}},
    "model": {"name": "mlp", "options": {"hidden": [16]}},
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"steps": 20, "eval_every": 10, "log_every": 5, "ema": 0.9, "cpu_threads": 1, "progress": "lines"},
}


def tiny_config(*overrides: str, classes: dict | None = None, **sections) -> RunConfig:
    """The tiny config with `dotted.key=value` overrides; `sections` replace top-level keys
    (e.g. plugins=["pi_model"]); `classes` adds plugin classes that are not installed."""
    raw = {**copy.deepcopy(TINY), **sections}
    return resolve(apply_overrides(raw, list(overrides)), schemas({**discover(), **(classes or {})}))
