"""Mean Teacher: the EMA teacher (warm-up, no gradient, an EMA of the student), batch norm, bf16, bad
settings and exact resume (the consistency terms against the official whole-batch form: test_fidelity.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssltrain import ConfigError, SSLPlugin, hookimpl
from ssltrain.loop import Trainer
from ssltrain.plugins import discover
from ssltrain_plugins.mean_teacher import consistency_weights, ema_decay_at

from conftest import make_config


class BNNet(SSLPlugin):
    """Owns a two-moons model with batch norm (the built-in MLP has none)."""

    @hookimpl
    def ssl_build_model(self, num_classes, input_shape):
        return nn.Sequential(nn.Linear(input_shape[0], 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))


def trainer_with(tmp_path, *overrides, extra=None, plugins=("mean_teacher",)):
    extra = extra or {}
    config = make_config(*overrides, classes=extra, plugins=[*plugins, *extra])
    return Trainer(config, tmp_path, {**discover(), **extra})


def modified(trainer, step=0):
    ctx = trainer.context(step, is_log=True)
    batch = trainer.draw(step)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return batch, ctx


def test_ema_decay_warms_up_as_the_true_average():
    assert [ema_decay_at(k, 0.99) for k in (1, 2, 3, 99, 100, 10_000)] == pytest.approx(
        [1 / 2, 2 / 3, 3 / 4, 0.99, 0.99, 0.99])
    assert consistency_weights(100.0, 16, 48) == (300.0, 100.0)


def test_teacher_is_the_warm_up_average_then_an_ema_of_the_student(tmp_path):
    trainer = trainer_with(tmp_path, "mean_teacher.ema_decay=0.7")
    plugin = trainer.pm.get_plugin("mean_teacher")
    modified(trainer)  # builds the teacher: a copy of the student
    student = trainer.model
    history = [[p.detach().clone() for p in student.parameters()]]
    for step in range(4):  # decays 1/2, 2/3, then 0.7 (3/4 > 0.7), 0.7
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p in student.parameters()])
        before = [p.detach().clone() for p in plugin.teacher.module.parameters()]
        plugin.ssl_step_end(ctx=trainer.context(step))
        decay = min(1 - 1 / (step + 2), 0.7)
        for t, old, s in zip(plugin.teacher.module.parameters(), before, student.parameters()):
            torch.testing.assert_close(t, decay * old + (1 - decay) * s)
        if step == 1:  # still warming up: the plain average of the student's weights so far
            for t, *versions in zip(plugin.teacher.module.parameters(), *history):
                torch.testing.assert_close(t, torch.stack(versions).mean(0))
    assert plugin.teacher.module is not student


def test_no_gradient_reaches_the_teacher_and_the_optimizer_leaves_it_alone(tmp_path):
    trainer = trainer_with(tmp_path, "mean_teacher.rampup_steps=0")
    batch, ctx = modified(trainer)
    plugin = trainer.pm.get_plugin("mean_teacher")
    teacher = [p.detach().clone() for p in plugin.teacher.module.parameters()]
    assert not any(p.requires_grad for p in plugin.teacher.module.parameters())
    assert not batch.extras["mean_teacher/targets_u"].requires_grad
    result = trainer.hook.ssl_optimizer_step(closure=trainer.make_closure(batch, ctx), model=trainer.model,
                                             optimizer=trainer.optimizer, scaler=trainer.scaler, ctx=ctx)
    assert result.loss.reduced["mean_teacher/consistency"] > 0
    assert all(p.grad is None for p in plugin.teacher.module.parameters())
    for t, old in zip(plugin.teacher.module.parameters(), teacher):
        assert torch.equal(t, old)  # only ssl_step_end moves the teacher


def test_teacher_targets_come_from_train_mode_without_touching_batch_norm(tmp_path):
    extra = {"bnnet": BNNet}
    trainer = trainer_with(tmp_path, extra=extra)
    student_bn = trainer.model[1]
    stats = [b.clone() for b in student_bn.buffers()]
    batch, ctx = modified(trainer)
    teacher = trainer.pm.get_plugin("mean_teacher").teacher.module
    assert teacher.training and all(torch.equal(a, b) for a, b in zip(stats, student_bn.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(stats, teacher[1].buffers()))
    targets = batch.extras["mean_teacher/targets_u"]
    eval_logits = teacher.eval()(batch.x_u)  # running statistics would give other logits
    assert targets.shape == (batch.x_u.shape[0], 2) and not torch.allclose(targets, eval_logits)


def test_bad_settings_fail_at_startup(tmp_path):
    for bad in ("mean_teacher.ema_decay=1", "mean_teacher.consistency=-1", "mean_teacher.view=mixed"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            make_config(bad, plugins=["mean_teacher"])
    with pytest.raises(ConfigError, match="'mean_teacher' and 'mixmatch' cannot run together|'mixmatch' and 'mean_teacher'"):
        trainer_with(tmp_path, plugins=("mean_teacher", "mixmatch"))


def test_bf16_terms_agree_with_fp32(tmp_path):
    terms = {}
    for amp in ("none", "bf16"):
        trainer = trainer_with(tmp_path / amp, f"train.amp={amp}", "mean_teacher.rampup_steps=0")
        batch, ctx = modified(trainer)
        terms[amp] = trainer.make_closure(batch, ctx)().reduced
    for name, value in terms["none"].items():
        torch.testing.assert_close(terms["bf16"][name], value, rtol=0.05, atol=1e-3)


def test_resume_is_exact_teacher_included(ssl_run):
    overrides = ["mean_teacher.rampup_steps=4", "mean_teacher.ema_decay=0.9"]
    straight = ssl_run(plugins=["mean_teacher"], steps=10, overrides=overrides)
    resumed = ssl_run(plugins=["mean_teacher"], steps=5, overrides=overrides).resume(steps=10)
    assert resumed.summary["steps"] == 10
    for a, b in [(straight.trainer.model, resumed.trainer.model),
                 (straight.plugin("mean_teacher").teacher.module, resumed.plugin("mean_teacher").teacher.module)]:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    assert straight.scalars("mean_teacher/teacher_acc_pct") and straight.scalars("mean_teacher/labeled")
