"""The pytest fixtures shipped for plugin authors (`ssltrain.testing`) do what docs/plugins.md says."""
from __future__ import annotations

import random

import pytest
import torch

from ssltrain import LossTerm, SSLPlugin, hookimpl


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class Ramped(SSLPlugin):
    """Entropy minimisation whose weight grows with a step counter it keeps itself (plugin state)."""

    saves_state = True

    def __init__(self, config=None):
        super().__init__(config)
        self.count = 0

    @hookimpl
    def ssl_unlabeled_loss(self, outputs):
        return LossTerm(f"{self.name}/entropy", entropy(outputs.logits_u), weight=0.05 * self.count)

    @hookimpl
    def ssl_step_end(self):
        self.count += 1

    @hookimpl
    def ssl_state_dict(self, state):
        if self.saves_state:
            state[self.name] = {"count": self.count}

    @hookimpl
    def ssl_load_state_dict(self, state):
        if self.name in state:
            self.count = state[self.name]["count"]


class Forgetful(Ramped):
    """The same plugin with its counter deliberately left out of checkpoints."""

    saves_state = False


class ForgetfulDiagnostic(SSLPlugin):
    """Unsaved state that only shows in a logged diagnostic (the largest loss seen so far)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.largest = torch.zeros(())

    @hookimpl
    def ssl_step_end(self, result):
        self.largest = torch.maximum(self.largest, result.loss.total.detach())

    @hookimpl
    def ssl_metrics(self):
        return {"diag/largest_loss": self.largest}


class PythonRandom(SSLPlugin):
    """Draws from Python's `random`, whose state checkpoints do not hold."""

    @hookimpl
    def ssl_unlabeled_loss(self, outputs):
        return LossTerm("pyrandom/entropy", entropy(outputs.logits_u), weight=random.random())


def test_assert_resumes_exactly_passes_for_state_that_is_saved(ssl_run):
    run = ssl_run(plugins=["pi_model", "ramped"], classes={"ramped": Ramped}, steps=20)
    assert int(run.checkpoint()["plugins"]["ramped"]["count"]) == 20
    run.assert_resumes_exactly(at=10)
    run.assert_resumes_exactly(at=7)  # between log steps: the straddling logging windows are left out


@pytest.mark.parametrize("plugin, what", [(Forgetful, "model"), (ForgetfulDiagnostic, "diag/largest_loss"),
                                          (PythonRandom, "model")])
def test_assert_resumes_exactly_fails_for_state_that_is_not_saved(ssl_run, plugin, what):
    name = plugin.__name__.lower()
    run = ssl_run(plugins=["pi_model", name], classes={name: plugin}, steps=20)
    with pytest.raises(AssertionError, match=f"after step 10 .*{what}.*ssl_state_dict"):
        run.assert_resumes_exactly(at=10)


def test_resume_continues_a_run_to_more_steps(ssl_run):
    run = ssl_run(plugins=["ramped"], classes={"ramped": Ramped}, steps=10)
    resumed = run.resume(steps=15)
    assert resumed.summary["steps"] == 15 and resumed.plugin("ramped").count == 15
    assert [step for step, _ in resumed.scalars("loss/total")] == [5, 10, 15]


def test_ssl_config_and_ssl_run_take_overrides_the_same_way(ssl_config, ssl_run):
    config = ssl_config(plugins=["pi_model"], overrides=["train.log_every=2", "pi_model.weight=3"],
                        optim={"name": "sgd", "lr": 0.1})
    assert config.plugins == ["pi_model"] and config.train.log_every == 2
    assert config.plugin("pi_model").weight == 3 and config.optim.name == "sgd"
    run = ssl_run(plugins=["pi_model"], steps=4, overrides=["train.log_every=2", "pi_model.weight=3"],
                  optim={"name": "sgd", "lr": 0.1})
    assert run.trainer.config.model_dump() == ssl_config(
        plugins=["pi_model"], overrides=["train.steps=4", "train.log_every=2", "pi_model.weight=3"],
        optim={"name": "sgd", "lr": 0.1}).model_dump()
    assert [step for step, _ in run.scalars("pi_model/consistency")] == [2, 4]
    with pytest.raises(TypeError, match="lists"):
        ssl_config("train.steps=5")
    with pytest.raises(TypeError, match="lists"):
        ssl_run(plugins=["pi_model"], overrides="train.steps=5")
