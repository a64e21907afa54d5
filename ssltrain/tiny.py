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


def tiny_config(plugins=(), classes: dict | None = None, overrides=(), **sections) -> RunConfig:
    """The tiny config with `plugins` enabled, `dotted.key=value` overrides applied and top-level
    `sections` replaced (e.g. `optim={"name": "sgd"}`); `classes` adds plugin classes that are not installed."""
    check_lists(plugins, overrides)
    raw = {**copy.deepcopy(TINY), "plugins": list(plugins), **sections}
    return resolve(apply_overrides(raw, list(overrides)), schemas({**discover(), **(classes or {})}))


def check_lists(plugins, overrides) -> None:
    """A clear error for a string where a list belongs (the fixtures' most likely misuse)."""
    if isinstance(plugins, str) or isinstance(overrides, str):
        raise TypeError("plugins and overrides are lists: e.g. ssl_run(plugins=['mine'], overrides=['mine.weight=2'])")
