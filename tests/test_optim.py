"""Optimizers, schedules, EMA, ramps and the batch-norm freeze."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssltrain.config import OptimConfig
from ssltrain.optim import EMA, build_optimizer, frozen_bn, linear_rampup, lr_factor, sigmoid_rampup


def test_ema_update_is_the_exponential_average_and_copies_buffers():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, 0.9)
    old = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))  # changes BN running stats
    ema.update()
    for e, o, p in zip(ema.module.parameters(), old, model.parameters()):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * p)
    for e, b in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(e, b)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_decoupled_weight_decay_multiplies_kernels_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    cfg = OptimConfig(name="adamw", lr=0.002, weight_decay=0.02)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["0.weight"], before["0.weight"] * (1 - 0.02 * 0.002), rtol=0, atol=1e-9)
    for name in ["0.bias", "1.weight", "1.bias"]:
        assert torch.equal(after[name], before[name])


def test_lr_schedules():
    cosine = OptimConfig(schedule="cosine", warmup_steps=10)
    assert lr_factor(0, 110, cosine) == pytest.approx(0.1)
    assert lr_factor(10, 110, cosine) == pytest.approx(1.0)
    assert lr_factor(60, 110, cosine) == pytest.approx(0.5)
    assert lr_factor(110, 110, cosine) == pytest.approx(0.0)
    step = OptimConfig(schedule="step", milestones=[5, 8], gamma=0.2)
    assert [lr_factor(s, 10, step) for s in (4, 5, 8)] == pytest.approx([1, 0.2, 0.04])
    assert lr_factor(999, 10, OptimConfig()) == 1.0


def test_rampups():
    assert linear_rampup(0, 16384) == 0 and linear_rampup(8192, 16384) == 0.5 and linear_rampup(20000, 16384) == 1
    assert sigmoid_rampup(0, 100) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(5, 0) == 1.0


def test_frozen_bn_keeps_running_stats_but_uses_batch_stats():
    bn = nn.BatchNorm1d(3)
    x = torch.randn(16, 3) * 5 + 2
    with frozen_bn(bn):
        y = bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    bn(x)
    assert not torch.equal(bn.running_mean, torch.zeros(3))


def test_schedule_shapes_as_documented():
    """docs/plugins.md, "Learning-rate schedules": min_lr_ratio is cosine's floor; fixmatch_cosine ignores it."""
    cosine = OptimConfig(schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cosine) == 1.0 and lr_factor(100, 100, cosine) == pytest.approx(0.1)
    assert lr_factor(50, 100, cosine) == pytest.approx(0.55)
    fixmatch = OptimConfig(schedule="fixmatch_cosine", min_lr_ratio=0.5, warmup_steps=10)
    assert lr_factor(0, 110, fixmatch) == pytest.approx(0.1) and lr_factor(10, 110, fixmatch) == 1.0
    assert lr_factor(110, 110, fixmatch) == pytest.approx(math.cos(7 * math.pi / 16))  # 0.195
    assert lr_factor(60, 110, fixmatch) == pytest.approx(math.cos(7 * math.pi / 32))
