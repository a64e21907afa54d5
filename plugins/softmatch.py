"""SoftMatch (Chen et al., ICLR 2023): soft truncated-Gaussian weights of the pseudo-labels instead of a hard
threshold, with uniform distribution alignment, faithful to the authors' code in USB
(microsoft/Semi-supervised-learning at 1ef4cbe): semilearn/algorithms/softmatch/softmatch.py (U),
semilearn/algorithms/softmatch/utils.py (X) and semilearn/algorithms/hooks/dist_align.py (D).

Per step, FixMatch's forward (one forward over cat(x_l, u_weak, u_strong), U:59-66) and, from the weak view's
probabilities q (detached, U:84):
- uniform alignment (D:26-33, U:87): p_model = EMA of the batch mean of q (momentum m; the first batch sets it,
  D:48-51), q' = SumNorm(q * (1/C + 1e-6) / (p_model + 1e-6)); the statistics update with this batch first (D:28);
- Gaussian statistics of the aligned confidence p = max_c q' (X:32-40, updated with this batch before the
  weights, X:66): mu_t = m mu_{t-1} + (1 - m) mean_b p, var_t = m var_{t-1} + (1 - m) var_b p (unbiased);
  mu_0 = 1/C, var_0 = 1 (X:24-26);
- weight of a row: lambda(p) = exp(-(min(p - mu_t, 0))^2 / (2 var_t / n_sigma^2)) (X:76): 1 above the mean, a
  Gaussian of std sqrt(var_t)/n_sigma below it;
- unlabeled term: mean over the unlabeled rows of lambda(p) * CE(logits_strong, argmax q), with the pseudo-label
  from the UNaligned q (U:93-98), times lambda_u (U:106).
Same normalisation as the official total (sup_loss + lambda_u * unsup_loss, both means): `lambda_u` unchanged.

Defaults (U:136-146, USB config/classic_cv/softmatch/softmatch_cifar10_40_0.yaml): lambda_u 1, n_sigma 2,
m 0.999 (`ema_p`), uniform alignment on, hard labels (T 0.5 soft only), uratio 7. `distribution_alignment: false`
turns the alignment off (USB stores a `dist_align` flag but always aligns, U:38-45, 87). Not offered: `per_class`
statistics and the labeled-marginal alignment target (`dist_uniform: false`), both off in the official configs.

The state (p_model, mu, var) moves once per step: the closure computes the updated statistics as a pure function of
the current ones and this batch, `ssl_step_end` commits the same function of the real update's forward. p_model
starts as zeros, meaning "not set": the first batch sets it. Under torchrun the batch statistics are averaged over
processes (USB all-gathers, X:33-34, D:42-45); the unbiased variance's factor n / (n - 1) then uses the
per-process batch size (a relative difference below 1 / B_u). The official update reads mu and var to the host
(`.item()`, X:39-40); here they stay on the device.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from ssltrain import all_reduce_mean, hookimpl

from ssltrain_plugins.pseudo_labeling import PseudoLabelConfig, WeakStrongPlugin, ema, guessed_probs, guessers_except


class Status(NamedTuple):
    """SoftMatch's running statistics: p_model [C] (zeros: not set yet), mu [], var []."""

    p_model: Tensor
    mu: Tensor
    var: Tensor


def initial_status(num_classes: int, device=None) -> Status:
    return Status(torch.zeros(num_classes, device=device), torch.tensor(1.0 / num_classes, device=device),
                  torch.tensor(1.0, device=device))


def align_uniform(probs: Tensor, p_model: Tensor) -> Tensor:
    """SumNorm(probs * (1/C + 1e-6) / (p_model + 1e-6)) per row (D:31-32 with a uniform p_target)."""
    aligned = probs * (1.0 / probs.shape[1] + 1e-6) / (p_model + 1e-6)
    return aligned / aligned.sum(-1, keepdim=True)


def truncated_gaussian(p: Tensor, mu: Tensor, var: Tensor, n_sigma: float) -> Tensor:
    """exp(-(min(p - mu, 0))^2 / (2 var / n_sigma^2)): 1 for p >= mu, in (0, 1) below (X:76)."""
    return torch.exp(-(torch.clamp(p - mu, max=0.0) ** 2) / (2 * var / n_sigma ** 2))


def update_status(status: Status, probs: Tensor, momentum: float, align: bool) -> tuple[Status, Tensor]:
    """(the statistics after this batch, the confidences p = max_c q' of its rows) (D:36-55, X:32-40)."""
    batch_p = all_reduce_mean(probs.mean(0))
    p_model = torch.where(status.p_model.sum() > 0, ema(status.p_model, batch_p, momentum), batch_p)
    top = (align_uniform(probs, p_model) if align else probs).max(-1).values
    n = top.numel()
    moments = all_reduce_mean(torch.stack([top.mean(), top.pow(2).mean()]))
    var = (moments[1] - moments[0] ** 2).clamp(min=0) * n / max(n - 1, 1)
    return Status(p_model, ema(status.mu, moments[0], momentum), ema(status.var, var, momentum)), top


class SoftMatch(WeakStrongPlugin):
    """The "softmatch/unlabeled" term: truncated-Gaussian weighted CE (module docstring)."""

    incompatible = guessers_except("softmatch")
    own_descriptions = {
        "mu": "mu_t, the EMA of the aligned max probability (X:39): rows at or above it get weight 1; in [0, 1].",
        "std": "sqrt(var_t), the EMA standard deviation of the aligned max probability (X:40); the weights' Gaussian "
               "has std sqrt(var_t) / n_sigma.",
    }

    class Config(PseudoLabelConfig):
        n_sigma: float = Field(2.0, gt=0, description="The Gaussian's std is sqrt(var) / n_sigma.")
        momentum: float = Field(0.999, gt=0, lt=1, description="EMA momentum of p_model, mu and var (official `ema_p`).")
        distribution_alignment: bool = Field(True, description="Uniform alignment of the confidences (official).")

    def setup(self, data, device):
        self.status = initial_status(data.num_classes, device)

    def _updated(self, outputs) -> tuple[Status, Tensor]:
        cfg = self.config
        return update_status(self.status, guessed_probs(outputs), cfg.momentum, cfg.distribution_alignment)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx):
        status, confidence = self._updated(outputs)  # with this batch, as the official weights
        weights = truncated_gaussian(confidence, status.mu, status.var, self.config.n_sigma)
        return self.masked_term(outputs, batch, ctx, weights, mu=status.mu, std=status.var.sqrt())

    @hookimpl
    def ssl_step_end(self, result):
        self.status = self._updated(result.loss.outputs)[0]
