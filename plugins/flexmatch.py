"""FlexMatch (Zhang et al., NeurIPS 2021): FixMatch with curriculum pseudo-labeling (per-class flexible
thresholds), faithful to the authors' code as merged into USB (microsoft/Semi-supervised-learning at 1ef4cbe):
semilearn/algorithms/flexmatch/flexmatch.py (U) and flexmatch/utils.py (X); the same formulas in TorchSSL
models/flexmatch/flexmatch.py:146-181 and flexmatch_utils.py:41-52 (T).

Per step, FixMatch's forward and loss (one forward over cat(x_l, u_weak, u_strong), U:64-68), with the fixed
threshold tau replaced by a per-class one:
- learning status: sigma_c = the number of unlabeled samples whose latest prediction above tau was c (X:55-61:
  `selected_label[idx] = argmax` where max prob >= tau, the fixed tau; T:180-181);
- normalised learning effect, with the threshold warm-up (X:24-35, T:146-156): beta_c = sigma_c /
  max(max_c' sigma_c', N_u - sum sigma) (N_u - sum sigma: the unlabeled samples never selected); without warm-up
  beta_c = sigma_c / max_c' sigma_c';
- flexible threshold of the row's argmax class c, with the convex mapping M(x) = x / (2 - x):
  T_c = tau * beta_c / (2 - beta_c) (X:53, T:44); mask = 1[max q >= T_c];
- unlabeled term: mean over the unlabeled rows of mask * CE(logits_strong, argmax q) (U:104-107), times
  lambda_u (U:109). Same normalisation as the official code: `lambda_u` unchanged.
At the start every beta_c is 0, so every threshold is 0 and every row is kept; a class's threshold rises
towards tau as its share of the confident predictions grows (the warm-up keeps thresholds low while most of the
unlabeled set has never been predicted confidently).

Order within a step, as the official code: the mask uses the learning effect of the previous steps; the rows of
this step then update `selected` and the learning effect (X:59-61, update() after the selection). Here the update
runs once per step in `ssl_step_end` from the real update's forward (a closure may run more than once per step,
e.g. DS3L's virtual step), so the state moves exactly once per step.

Defaults (U:133-140, USB config/classic_cv/flexmatch/flexmatch_cifar10_40_0.yaml): tau 0.95, lambda_u 1, hard
labels, T 0.5 (soft labels only), threshold warm-up on, uratio 7; SGD/cosine/EMA as FixMatch
(configs/flexmatch_fashion_mnist.yaml).

State (checkpointed): `selected` [N] (one entry per dataset row; only unlabeled rows are ever set) and
`learning_effect` [C]. Deviations: the official code recounts a Python Counter each step; here a bincount on the
device (no host sync). Under torchrun each process updates `selected` from its own rows, as USB does (X:59-61,
no gather), so the processes' thresholds may differ slightly. Distribution alignment (TorchSSL `use_DA`, off by
default there) is not offered.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from ssltrain import hookimpl

from ssltrain_plugins.pseudo_labeling import (PseudoLabelConfig, WeakStrongPlugin, confidence_mask, guessed_probs,
                                              guessers_except, learning_effect, select_confident)


class Status(NamedTuple):
    """selected [N]: the latest confident class of each dataset row (-1: none); learning_effect [C]: beta."""

    selected: Tensor
    learning_effect: Tensor


def flexible_thresholds(beta: Tensor, tau: float) -> Tensor:
    """T_c = tau * M(beta_c) with the convex mapping M(x) = x / (2 - x): 0 at beta 0, tau at beta 1 (X:53)."""
    return tau * beta / (2 - beta)


class FlexMatch(WeakStrongPlugin):
    """The "flexmatch/unlabeled" term with per-class thresholds from the learning status (module docstring)."""

    incompatible = guessers_except("flexmatch")

    class Config(PseudoLabelConfig):
        threshold: float = Field(0.95, gt=0, le=1, description="Tau: the fixed threshold that selects and that T_c rises to.")
        threshold_warmup: bool = Field(True, description="Count never-selected samples in beta's denominator (official default).")

    def __init__(self, config=None):
        super().__init__(config)
        self.num_unlabeled = 0

    def setup(self, data, device):
        self.status = Status(torch.full((len(data.train_x),), -1, dtype=torch.long, device=device),
                             torch.zeros(data.num_classes, device=device))
        self.num_unlabeled = len(data.unlabeled_idx)

    def thresholds(self) -> Tensor:
        """The current per-class thresholds T_c [C]."""
        return flexible_thresholds(self.status.learning_effect, self.config.threshold)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx):
        probs = guessed_probs(outputs)
        thresholds = self.thresholds()
        return self.masked_term(outputs, batch, ctx, confidence_mask(probs, thresholds[probs.argmax(-1)]), thresholds)

    @hookimpl
    def ssl_step_end(self, result, batch):
        cfg = self.config
        selected = select_confident(self.status.selected, batch.idx_u, guessed_probs(result.loss.outputs), cfg.threshold)
        beta = self.status.learning_effect
        self.status = Status(selected, learning_effect(selected, self.num_unlabeled, beta.numel(),
                                                       cfg.threshold_warmup, beta))
