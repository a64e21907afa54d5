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

import torch
from pydantic import Field
from torch import Tensor

from ssltrain import LossTerm, Section, hookimpl

from ssltrain_plugins.pseudo_labeling import (WEAK_LOGITS, WeakStrongPlugin, confidence_mask, diagnostics,
                                              guessed_probs, guessers_except, hard_or_soft_targets, learning_effect,
                                              pseudo_label_loss, select_confident)


def flexible_thresholds(beta: Tensor, tau: float) -> Tensor:
    """T_c = tau * M(beta_c) with the convex mapping M(x) = x / (2 - x): 0 at beta 0, tau at beta 1 (X:53)."""
    return tau * beta / (2 - beta)


class FlexMatch(WeakStrongPlugin):
    """The "flexmatch/unlabeled" term with per-class thresholds from the learning status (module docstring)."""

    incompatible = guessers_except("flexmatch")

    class Config(Section):
        threshold: float = Field(0.95, gt=0, le=1)  # tau: the fixed threshold that selects and that T_c rises to
        lambda_u: float = Field(1.0, ge=0)  # weight of the unlabeled term
        threshold_warmup: bool = True  # count never-selected samples in beta's denominator (official default)
        hard_label: bool = True  # argmax pseudo-labels (official); False: softmax(weak / T)
        T: float = Field(0.5, gt=0)  # temperature of soft targets (hard_label: false only)

    def __init__(self, config=None):
        super().__init__(config)
        self.selected: Tensor | None = None  # [N] latest confident class of each dataset row, -1 none
        self.beta: Tensor | None = None  # [C] normalised learning effect
        self.num_unlabeled = 0

    def setup(self, data, device):
        self.selected = torch.full((len(data.train_x),), -1, dtype=torch.long, device=device)
        self.beta = torch.zeros(data.num_classes, device=device)
        self.num_unlabeled = len(data.unlabeled_idx)

    def thresholds(self) -> Tensor:
        """The current per-class thresholds T_c [C]."""
        return flexible_thresholds(self.beta, self.config.threshold)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx):
        cfg = self.config
        probs = guessed_probs(outputs)
        thresholds = self.thresholds()
        mask = confidence_mask(probs, thresholds[probs.argmax(-1)])
        targets = hard_or_soft_targets(outputs.extras_u[WEAK_LOGITS], cfg.hard_label, cfg.T)
        if ctx.is_log_step:
            self.diagnostics = diagnostics(self.name, probs, mask, batch.y_u_hidden, thresholds)
        return LossTerm("flexmatch/unlabeled", pseudo_label_loss(outputs.logits_u, targets, mask), weight=cfg.lambda_u)

    @hookimpl
    def ssl_step_end(self, result, batch):
        probs = guessed_probs(result.loss.outputs)
        self.selected = select_confident(self.selected, batch.idx_u, probs, self.config.threshold)
        self.beta = learning_effect(self.selected, self.num_unlabeled, self.beta.numel(),
                                    self.config.threshold_warmup, self.beta)

    @hookimpl
    def ssl_state_dict(self, state):
        state[self.name] = {"selected": self.selected, "learning_effect": self.beta}

    @hookimpl
    def ssl_load_state_dict(self, state):
        saved = state[self.name]
        self.selected = saved["selected"].to(self.selected.device)
        self.beta = saved["learning_effect"].to(self.beta.device)
