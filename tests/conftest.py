"""Shared helpers: tiny configs that train in well under a second on the CPU."""
from __future__ import annotations

import pytest

from ssltrain.config import apply_overrides, resolve
from ssltrain.plugins import discover, schemas

TINY = {
    "seed": 0,
    "plugins": [],
    "data": {"name": "two_moons", "options": {"n_train": 200, "n_test": 200, "noise": 0.1},
             "num_labeled": 8, "batch_size": 16, "unlabeled_batch_size": 32, "augment": {"noise_std": 0.1}},
    "model": {"name": "mlp", "options": {"hidden": [16]}},
    "optim": {"name": "adam", "lr": 0.01},
    "train": {"steps": 20, "eval_every": 10, "log_every": 5, "ema": 0.9, "cpu_threads": 1, "progress": "lines"},
}


def make_config(*overrides: str, classes: dict | None = None, **sections):
    """A validated tiny RunConfig; `overrides` are `dotted.key=value` strings, `sections`
    replace whole top-level keys (e.g. plugins=["pi_model"])."""
    classes = {**discover(), **(classes or {})}
    raw = {**TINY, **sections}
    return resolve(apply_overrides(raw, list(overrides)), schemas(classes))


@pytest.fixture
def tiny():
    return make_config
