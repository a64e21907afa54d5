"""Optimizers, learning-rate schedules, EMA of weights, ramp-ups and a batch-norm freeze."""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch
from torch import nn

from .config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW over the trainable parameters. Unless `decay_bias_and_norm`, biases and
    norm weights (parameters with ndim <= 1) get no weight decay. AdamW's decay is decoupled:
    each step multiplies a decayed weight by (1 - lr * weight_decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.decay_bias_and_norm or cfg.weight_decay == 0:
        groups = [{"params": params}]
    else:
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **fused)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **fused)


#: Learning-rate schedules by name: fn(step, total, cfg) -> multiplier of the base lr, where `step`
#: counts from the end of the warm-up and `total` is the number of steps after it.
SCHEDULES: dict[str, Callable[[int, int, OptimConfig], float]] = {}


def register_schedule(name: str):
    """Decorator that adds a learning-rate schedule `fn(step, total, cfg) -> float` under `name`,
    selectable as `optim.schedule: name` (the core applies `optim.warmup_steps` before it). Register at
    import time of the plugin module, so the name is known when configs are validated."""
    def add(fn):
        SCHEDULES[name] = fn
        return fn
    return add


@register_schedule("constant")
def _constant(step: int, total: int, cfg: OptimConfig) -> float:
    """1 throughout."""
    return 1.0


@register_schedule("cosine")
def _cosine(step: int, total: int, cfg: OptimConfig) -> float:
    """Half a cosine from 1 down to `min_lr_ratio` at the last step (SGDR without restarts)."""
    t = min(step / max(1, total), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@register_schedule("step")
def _step(step: int, total: int, cfg: OptimConfig) -> float:
    """`gamma` ** (number of `milestones` passed); milestones count from step 0, warm-up included."""
    return cfg.gamma ** sum(step + cfg.warmup_steps >= m for m in cfg.milestones)


@register_schedule("fixmatch_cosine")
def _fixmatch_cosine(step: int, total: int, cfg: OptimConfig) -> float:
    """cos(7 pi k / (16 K)): FixMatch's decay, from 1 to cos(7 pi / 16) = 0.195 at the last step
    (google-research/fixmatch fixmatch.py:95-98; USB semilearn/core/utils/build.py get_cosine_schedule_with_warmup)."""
    return math.cos(7 * math.pi * min(step / max(1, total), 1.0) / 16)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at `step`: linear warm-up over `warmup_steps`, then the named schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return SCHEDULES[cfg.schedule](step - cfg.warmup_steps, total - cfg.warmup_steps, cfg)


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def linear_rampup(step: int, length: int) -> float:
    """0 at step 0, rising linearly to 1 at `length` (MixMatch's lambda_u ramp)."""
    return 1.0 if length <= 0 else min(step / length, 1.0)


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t)^2) with t = step / length clipped to 1 (Laine & Aila; Oliver et al.)."""
    if length <= 0:
        return 1.0
    t = min(step / length, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class EMA:
    """Exponential moving average of a model's parameters; buffers are copied from the model.

    `module` is a frozen copy used for evaluation. `update` is two foreach kernels, no Python
    loop over parameters and no state_dict reloads.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)
        self._ema_params = list(self.module.parameters())
        self._params = list(model.parameters())
        self._ema_buffers = list(self.module.buffers())
        self._buffers = list(model.buffers())

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._ema_params, self._params, 1.0 - self.decay)
        if self._buffers:
            torch._foreach_copy_(self._ema_buffers, self._buffers)


@contextlib.contextmanager
def frozen_bn(model: nn.Module):
    """Batch norm uses batch statistics but does not update its running statistics."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
