"""docs/plugins.md states the truth: its public-face table, fixture signatures, worked examples and
errors table are checked against the code."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import ssltrain
from ssltrain import (CheckpointError, ConfigError, Interrupted, LossTerm, NonFiniteLossError, PluginConflictError,
                      PluginContractError, PluginError, SSLPlugin, checkpoint, hookimpl)
from ssltrain.losses import reduce_term
from ssltrain.loop import Trainer
from ssltrain.plugins import discover
from ssltrain.testing import run_tiny, tiny_config

from conftest import make_config
from test_plugin_manager import PredictA, PredictB, manager

DOCS = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()


def section(title: str) -> str:
    """The text of the docs section whose heading starts with `title`, up to the next heading of its level."""
    match = re.search(rf"^(#+) {re.escape(title)}.*?$(.*?)(?=^\1 |\Z)", DOCS, re.S | re.M)
    assert match, title
    return match.group(2)


def test_the_public_face_table_lists_every_export_where_it_is_defined():
    table = section("The public face")
    for name in (n for n in ssltrain.__all__ if n != "__version__"):
        row = next((line for line in table.splitlines() if re.search(rf"`{name}[`(]", line)), None)
        assert row is not None, f"{name} is exported but not in the docs' public-face table"
        path = re.search(r"`(ssltrain/\w+)\.py`", row).group(1)
        assert getattr(importlib.import_module(path.replace("/", ".")), name) is getattr(ssltrain, name), row


def test_the_fixture_signatures_in_the_docs_are_the_real_ones(ssl_run):
    def plain(fn) -> str:
        params = inspect.signature(fn).parameters.values()
        return ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in params)

    assert f"ssl_config({plain(tiny_config)})" in DOCS
    assert f"ssl_run({plain(ssl_run)})" in DOCS
    assert plain(ssl_run) == plain(run_tiny).removeprefix("run_dir, ")
    for method in ("resume", "assert_resumes_exactly", "scalars", "plugin", "checkpoint"):
        assert f"run.{method}(" in DOCS, method


def worked_example(title: str) -> dict:
    """Execute the first Python block of a worked example; returns its namespace."""
    code = re.search(r"```python\n(.*?)```", section(title), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, title, "exec"), namespace)
    return namespace


def test_worked_example_1_a_loss_only_plugin_runs(ssl_run):
    example = worked_example("Worked example 1")
    run = ssl_run(plugins=["pi_model", "entmin"], classes={"entmin": example["EntropyMin"]}, steps=10,
                  overrides=["entmin.rampup_steps=4"])
    assert [step for step, _ in run.scalars("entmin/entropy")] == [5, 10]


def test_worked_example_2_a_forward_owning_plugin_runs_and_resumes_exactly(ssl_run):
    example = worked_example("Worked example 2")
    run = ssl_run(plugins=["ws"], classes={"ws": example["WeakStrong"]}, steps=10, overrides=["ws.threshold=0.6"])
    assert run.scalars("ws/consistency")
    run.assert_resumes_exactly(at=5)


class Typo(SSLPlugin):
    @hookimpl
    def ssl_unlabelled_loss(self):
        return None


class BadArgument(SSLPlugin):
    @hookimpl
    def ssl_unlabeled_loss(self, labels):
        return None


class Heads(SSLPlugin):
    incompatible = {"tails": "both flip the same coin"}


class Explode(SSLPlugin):
    @hookimpl
    def ssl_unlabeled_loss(self, batch):
        return LossTerm("explode/nan", torch.full((batch.x_u.shape[0],), float("nan")))


def interrupted(tmp_path):
    trainer = Trainer(make_config(), tmp_path)
    trainer.stop.requested = True  # as a SIGTERM during the first step
    trainer.fit()


TRIGGERS = {  # key phrase of a docs row -> (how to raise it, the class the row names)
    "can have one owner": (lambda tmp: manager({"a": PredictA, "b": PredictB}), PluginConflictError),
    "implements unknown hook": (lambda tmp: manager({"x": Typo}), PluginError),
    "takes unknown argument": (lambda tmp: manager({"x": BadArgument}), PluginError),
    "cannot run together": (lambda tmp: manager({"heads": Heads, "tails": SSLPlugin}), ConfigError),
    "is not installed": (lambda tmp: make_config(plugins=["not_a_plugin"]), ConfigError),
    "unknown config key": (lambda tmp: make_config("pi_model.wieght=1", plugins=["pi_model"]), ConfigError),
    "unknown schedule": (lambda tmp: make_config("optim.schedule=cosin"), ConfigError),
    "per_sample has shape": (lambda tmp: reduce_term(LossTerm("x/y", torch.ones(3)), None, 4), PluginContractError),
    "became non-finite": (lambda tmp: Trainer(make_config(classes={"explode": Explode}, plugins=["explode"]), tmp,
                                              {**discover(), "explode": Explode}).fit(), NonFiniteLossError),
    "does not fit this model": (lambda tmp: Trainer(make_config(), tmp).load_state_dict({"model": {}}), CheckpointError),
    "with a different config": (lambda tmp: checkpoint.check_same_run({"seed": 0}, {"seed": 1}), ConfigError),
    "stopped by signal": (interrupted, Interrupted),
}


@pytest.mark.parametrize("phrase", list(TRIGGERS))
def test_each_documented_error_raises_the_class_its_row_names(tmp_path, phrase):
    trigger, cls = TRIGGERS[phrase]
    with pytest.raises(cls, match=re.escape(phrase)):
        trigger(tmp_path)
    rows = [line for line in section("Errors").splitlines() if line.startswith("| `") and phrase in line]
    assert len(rows) == 1 and rows[0].startswith(f"| `{cls.__name__}` |"), rows


def test_the_documented_schedule_registration_works():
    from ssltrain.optim import SCHEDULES, lr_factor
    code = re.search(r"```python\n(.*?)```", section("Learning-rate schedules"), re.S).group(1)
    try:
        exec(compile(code, "schedule example", "exec"), {})
        optim = make_config("optim.schedule=linear_to_zero", "optim.min_lr_ratio=0.2").optim
        assert [lr_factor(s, 10, optim) for s in (0, 5, 10)] == pytest.approx([1.0, 0.6, 0.2])
    finally:
        SCHEDULES.pop("linear_to_zero", None)
    with pytest.raises(ConfigError, match="unknown schedule 'linear_to_zero'.*registered"):
        make_config("optim.schedule=linear_to_zero")
