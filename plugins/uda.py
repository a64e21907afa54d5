"""UDA: unsupervised data augmentation (Xie et al., NeurIPS 2020), faithful to the authors' code,
google-research/uda image/main.py (G) and image/scripts/run_cifar10_gpu.sh (S); USB's port is
microsoft/Semi-supervised-learning at 1ef4cbe semilearn/algorithms/uda/uda.py (U).

Per step, one forward over cat(x_l, u_ori, u_aug) (G:316-318, 347-350): the weak view ("ori": flip and crop,
image/data.py:67-82) and the strong view ("aug": RandAugment + cutout, image/preprocess.py:292-297), then
- sharpened target: t = softmax(sg(logits_weak) / T) (G:352-353, 364);
- confidence mask: 1[max softmax(logits_weak) > beta] (strict, un-sharpened, G:367-374);
- unlabeled term: mean over the unlabeled rows of mask * KL(t || softmax(logits_strong)) (G:363-365, 384), times
  the coefficient (G:385, `unsup_coeff`);
- training signal annealing (TSA) of the supervised loss, off by default as in the official CIFAR-10 script (S):
  the threshold eta_t = alpha_t (1 - 1/C) + 1/C with alpha_t = t/T (linear), exp(5 (t/T - 1)) (exp) or
  1 - exp(-5 t/T) (log), t the step, T the steps (G:178-190, 270-274); a labeled row whose probability of its
  label is above eta_t is dropped, and the supervised loss is the mean over the kept rows,
  sum(mask * CE) / max(sum mask, 1) (G:276-287).
The official total is avg_sup_loss + unsup_coeff * mean(mask * KL) (G:345, 385): the supervised mean is the
core's, so TSA returns per-row losses mask * CE * B_l / max(sum mask, 1) whose plain mean is the official
average, and `lambda_u` is the official coefficient unchanged. TSA is a wrapper of `ssl_supervised_loss` (it
rescales whatever the supervised loss owner returns; soft labels use the label-weighted probability).

Defaults (S, G:99-105, 162-165): T 0.4, beta 0.8, lambda_u 1, TSA off, uratio 7 (`unsup_ratio`), SGD lr 0.03,
weight decay 5e-4, the cos(7 pi k / 16 K) decay (G:452), EMA 0.9999 (`moving_average_decay`); the core
settings are in configs/uda_fashion_mnist.yaml. Not offered: entropy minimisation (`ent_min_coeff`, 0 by default).

Differences from USB's port (U): USB takes CE against the sharpened target instead of the KL (U:98-101: the
gradients are equal, the logged value differs by the targets' entropy), keeps rows with max prob >= 0.8 (`ge`,
hooks/masking.py:56) and its TSA keeps labeled rows whose MAX probability is <= eta and averages over all labeled
rows (U:75-78). This plugin follows the authors' code.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ssltrain import LossTerm, Section, hookimpl

from ssltrain_plugins.pseudo_labeling import (WEAK_LOGITS, WeakStrongPlugin, class_probs, confidence_mask,
                                              diagnostics, guessed_probs, guessers_except)
from ssltrain_plugins.vat import kl_div

TSA_SCHEDULES = ("none", "linear", "exp", "log")


def tsa_threshold(schedule: str, progress: float, num_classes: int) -> float:
    """eta = alpha (1 - 1/C) + 1/C with alpha(progress) linear, exp or log (G:178-190); 'none' gives 1 (keep all).
    Rises from 1/C (exp: 1/C + e^-5 (1 - 1/C)) to 1 (log: 1 - e^-5 (1 - 1/C))."""
    if schedule == "none":
        return 1.0
    alpha = {"linear": progress, "exp": math.exp(5 * (progress - 1)), "log": 1 - math.exp(-5 * progress)}[schedule]
    return alpha * (1 - 1 / num_classes) + 1 / num_classes


def label_probability(logits: Tensor, y: Tensor) -> Tensor:
    """The probability of each row's label, detached [N]: int labels [N] or soft targets [N, C] (weighted)."""
    p = logits.detach().float().softmax(-1)
    return p.gather(1, y.view(-1, 1)).squeeze(1) if y.dim() == 1 else (p * y).sum(-1)


def annealed(per_row: Tensor, label_prob: Tensor, threshold: float) -> Tensor:
    """Per-row supervised losses whose plain mean is sum(mask * l) / max(sum mask, 1), mask = 1[p_label <= eta]
    (rows above the threshold dropped, G:281-287)."""
    keep = (label_prob <= threshold).float()
    return per_row * keep * (per_row.shape[0] / keep.sum().clamp(min=1))


class UDA(WeakStrongPlugin):
    """The "uda/unlabeled" term (masked KL to the sharpened weak view) and optional TSA (module docstring)."""

    incompatible = guessers_except("uda")

    class Config(Section):
        lambda_u: float = Field(1.0, ge=0, description="Coefficient of the unlabeled term (official `unsup_coeff`).")
        T: float = Field(0.4, gt=0, description="Softmax temperature of the targets (official `uda_softmax_temp`).")
        threshold: float = Field(0.8, gt=0, le=1, description="Beta: keep rows whose weak max prob is above it.")
        tsa: Literal["none", "linear", "exp", "log"] = Field("none", description="Training signal annealing schedule.")

    def __init__(self, config=None):
        super().__init__(config)
        self.tsa_diagnostics: dict[str, Tensor] = {}  # threshold and kept share of the labeled rows (TSA on)

    def soft_targets(self, outputs):
        return class_probs(outputs.extras_u[WEAK_LOGITS], self.config.T)

    @hookimpl(wrapper=True)
    def ssl_supervised_loss(self, outputs, batch, ctx):
        per_row = yield
        if self.config.tsa == "none":
            return per_row
        eta = tsa_threshold(self.config.tsa, ctx.step / ctx.total_steps, ctx.num_classes)
        label_prob = label_probability(outputs.logits_l, batch.y_l)
        if ctx.is_log_step:
            self.tsa_diagnostics = {"uda/tsa_threshold": torch.tensor(eta),
                                    "uda/sup_trained_ratio": (label_prob <= eta).float().mean()}
        return annealed(per_row, label_prob, eta)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx):
        cfg = self.config
        probs = guessed_probs(outputs)
        mask = confidence_mask(probs, cfg.threshold, strict=True)
        loss = kl_div(outputs.extras_u[WEAK_LOGITS] / cfg.T, outputs.logits_u) * mask
        if ctx.is_log_step:
            self.diagnostics = {**diagnostics(self.name, probs, mask, batch.y_u_hidden), **self.tsa_diagnostics}
        return LossTerm("uda/unlabeled", loss, weight=cfg.lambda_u)
