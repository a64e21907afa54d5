"""FreeMatch (Wang et al., ICLR 2023): self-adaptive thresholds and the self-adaptive fairness term, faithful to
the authors' code in USB (microsoft/Semi-supervised-learning at 1ef4cbe): semilearn/algorithms/freematch/freematch.py
(U) and semilearn/algorithms/freematch/utils.py (X); cf. TorchSSL models/freematch_entropy/.

Per step, FixMatch's forward (one forward over cat(x_l, u_weak, u_strong), U:72-79) and, from the weak view's
probabilities q (detached):
- running class statistics, updated with this batch BEFORE the mask (X:61 then X:63-65), EMA momentum m:
  tau_t = m tau_{t-1} + (1 - m) mean_b max_c q_bc (global confidence, X:32); p~_t = m p~_{t-1} + (1 - m) mean_b q_b
  (per-class expectation, X:37); h_t = m h_{t-1} + (1 - m) hist(argmax q) / B_u (X:38-39); initial tau_0 =
  1/C, p~_0 = h_0 = uniform (X:19-21);
- self-adaptive per-class threshold of the row's argmax class c: tau_t * p~_t(c) / max_c' p~_t(c')
  (X:64-65); mask = 1[max q >= that];
- unlabeled term: mean over the unlabeled rows of mask * CE(logits_strong, argmax q) (U:107-110), times lambda_u;
- fairness term (U:16-44, 113-118), on the strong logits of the kept rows (none kept: 0): with
  p_s = softmax(logits_strong) of those rows and h_s the histogram of their argmax (normalised),
  L_f = sum_c SumNorm(p~_t / h_t)_c * log(SumNorm(mean p_s / sg(h_s))_c + 1e-12), 1/0 read as 0 (U:32-43);
  this is -H(SumNorm(p~/h), SumNorm(p̄/h̄)) of the paper. Minimising it, as the official total does with a
  positive coefficient, raises the cross-entropy between the two normalised marginals: it spreads the batch's
  predictions over the classes. Weighted by lambda_f (official `ent_loss_ratio`).
Official total: sup_loss + lambda_u * unsup_loss + lambda_e * ent_loss, both means as the core's (U:118), so the
coefficients carry over unchanged. The fairness term is one number per step (`weighted=False`: per-row weights,
e.g. DS3L's, do not apply to it).

Defaults: lambda_u 1 (USB train.py:88), lambda_f 0.001 (every config/classic_cv/freematch/*.yaml sets
ent_loss_ratio 0.001; the argument default U:150 is 0.01), m 0.999 (U:149), hard labels, T 0.5, uratio 7. Not
offered: `use_quantile` and `clip_thresh` (off in the official configs, X:29-35).

The state moves once per step: the closure computes the updated statistics as a pure function of the current
ones and this batch (so the mask and the fairness term see them, as X:61), and `ssl_step_end` commits the same
function of the real update's forward. Under torchrun the batch statistics are averaged over the processes
(equal to USB's all-gather for equal per-process batches, X:25-26).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ssltrain import LossTerm, all_reduce_mean, hookimpl

from ssltrain_plugins.pseudo_labeling import (PseudoLabelConfig, WeakStrongPlugin, confidence_mask, ema, guessed_probs,
                                              guessers_except)


class Status(NamedTuple):
    """FreeMatch's running statistics: global confidence tau [], class expectation p_model [C], label_hist [C]."""

    tau: Tensor
    p_model: Tensor
    label_hist: Tensor


def initial_status(num_classes: int, device=None) -> Status:
    uniform = torch.full((num_classes,), 1.0 / num_classes, device=device)
    return Status(uniform.mean(), uniform, uniform.clone())


def update_status(status: Status, probs: Tensor, momentum: float) -> Status:
    """One EMA step of the statistics with a batch of probabilities [B, C] (X:27-39); the batch means are averaged
    over processes under torchrun (one collective)."""
    top, label = probs.max(-1)
    c = probs.shape[1]
    hist = F.one_hot(label, c).float().mean(0)
    batch = all_reduce_mean(torch.cat([top.mean().view(1), probs.mean(0), hist]))
    return Status(ema(status.tau, batch[0], momentum), ema(status.p_model, batch[1:c + 1], momentum),
                  ema(status.label_hist, batch[c + 1:], momentum))


def self_adaptive_thresholds(status: Status) -> Tensor:
    """tau_t * p~(c) / max_c' p~(c') for every class c, [C] (X:64)."""
    return status.tau * status.p_model / status.p_model.max()


def inverse_or_zero(x: Tensor) -> Tensor:
    """1 / x with 1/0 read as 0 (U:12-14)."""
    return torch.where(x > 0, 1 / x, torch.zeros_like(x))


def fairness_loss(logits_strong: Tensor, mask: Tensor, status: Status) -> Tensor:
    """The self-adaptive fairness term over the kept rows (mask 1), a 0-dim tensor; 0 when no row is kept (U:16-44,
    113-116). Written with the mask as weights (no data-dependent shapes, no host sync)."""
    p_s = logits_strong.float().softmax(-1)
    kept = mask.float()
    n = kept.sum()
    hist_s = (F.one_hot(p_s.argmax(-1), p_s.shape[1]).float() * kept[:, None]).sum(0) / n.clamp(min=1)
    mean_p_s = (p_s * kept[:, None]).sum(0) / n.clamp(min=1)
    target = status.p_model * inverse_or_zero(status.label_hist)
    target = target / target.sum()
    modulated = mean_p_s * inverse_or_zero(hist_s).detach()
    modulated = modulated / modulated.sum().clamp(min=1e-12)
    loss = (target * torch.log(modulated + 1e-12)).sum()
    return torch.where(n > 0, loss, torch.zeros_like(loss))


class FreeMatch(WeakStrongPlugin):
    """The "freematch/unlabeled" (masked CE) and "freematch/fairness" terms (module docstring)."""

    incompatible = guessers_except("freematch")
    own_descriptions = {
        "fairness": "lambda_f times the self-adaptive fairness term: sum_c SumNorm(p~/h)_c log SumNorm(mean p_s / h_s)_c "
                    "over the kept strong rows (U:16-44), one number per step, <= 0.",
        "global_threshold": "tau_t, the EMA of the weak view's mean max probability (X:32), in [0, 1].",
    }

    class Config(PseudoLabelConfig):
        lambda_f: float = Field(0.001, ge=0, description="Weight of the fairness term (official `ent_loss_ratio` in the configs).")
        momentum: float = Field(0.999, gt=0, lt=1, description="EMA momentum of the statistics (official `ema_p`).")

    def setup(self, data, device):
        self.status = initial_status(data.num_classes, device)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx):
        probs = guessed_probs(outputs)
        status = update_status(self.status, probs, self.config.momentum)  # with this batch, as the official mask
        thresholds = self_adaptive_thresholds(status)
        mask = confidence_mask(probs, thresholds[probs.argmax(-1)])
        fairness = fairness_loss(outputs.logits_u, mask, status)
        return [self.masked_term(outputs, batch, ctx, mask, thresholds, global_threshold=status.tau),
                LossTerm("freematch/fairness", fairness.view(1), weight=self.config.lambda_f, weighted=False)]

    @hookimpl
    def ssl_step_end(self, result):
        self.status = update_status(self.status, guessed_probs(result.loss.outputs), self.config.momentum)
