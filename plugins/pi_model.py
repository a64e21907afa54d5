"""Pi-model (Laine & Aila 2017; the base loss DS3L weights, methods.md section 3b).

Consistency between two stochastic views of each unlabeled sample: the squared distance between
the class probabilities of a second view and the (detached) probabilities of the first (the main
forward), averaged over classes (brain-research/realistic-ssl-evaluation lib/ssl_utils.py:69-81;
perrying/realistic-ssl-evaluation-pytorch lib/algs/pimodel.py:16; google-research/mixmatch pi_model.py:51).

Weight and ramp-up (docs/fidelity.md). Both reference codes train an effective 20 against the mean
cross-entropy of the labeled rows at their equal labeled/unlabeled batches:
- Oliver et al.: max_cons_multiplier 20 (brain-research lib/hparams.py:65-69; perrying config.py:42-46),
  CE and consistency both summed over their rows and divided by the whole batch (ssl_framework.py:125-130,
  ssl_utils.py:109-111), i.e. 20 * B_u / B_l = 20 at their 50 + 50 rows; ramp exp(-5 (1 - t)^2) over
  200k of 500k steps (hparams.py:30, ssl_framework.py:160-171; perrying config.py:5-6, train.py:152);
- google-research/mixmatch: per-batch means, `--consistency_weight=20` in its paper runs (runs/table5.sh:26;
  the flag default 10, pi_model.py:107), a linear ramp over the first 40% of training (pi_model.py:41, 108).
Here: the term is a mean over the unlabeled rows, `weight` is its coefficient against the labeled mean
(default 20, equal to both at equal batch sizes), ramped with exp(-5 (1 - t)^2) (Oliver et al.'s shape)
over `rampup_steps`, by default 40% of `train.steps` (both references' 40%). That default follows
`train.steps`, like a cosine lr schedule: to extend a run with --resume, set `rampup_steps` explicitly.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ssltrain import LossTerm, SSLPlugin, Section, hookimpl, sigmoid_rampup

#: default ramp-up length as a fraction of the run (Oliver et al. 200k of 500k steps; mixmatch warmup_pos 0.4)
RAMPUP_FRACTION = 0.4


def consistency_mse(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Per sample (1/C) * ||softmax(logits) - sg(softmax(target_logits))||^2, shape [N]."""
    target = target_logits.detach().float().softmax(-1)
    return (logits.float().softmax(-1) - target).pow(2).mean(-1)


class PiModel(SSLPlugin):
    """Adds "pi_model/consistency": weight * ramp(step) * mean over unlabeled samples of Omega."""

    descriptions = {"pi_model/consistency": "weight * ramp * mean over the unlabeled rows of (1/C)||softmax(view 2) "
                                            "- softmax(view 1)||^2."}

    class Config(Section):
        weight: float = Field(20.0, ge=0, description="Coefficient against the labeled mean cross-entropy after the "
                                                     "ramp-up (Oliver et al., google-research/mixmatch: 20)")
        rampup_steps: int | None = Field(None, ge=0, description="exp(-5 (1 - t)^2) ramp-up length in steps; None: 40% "
                                                                 "of train.steps; 0: no ramp")
        view: Literal["weak", "strong"] = Field("weak", description="Augmentation of the second view")

    def describe(self) -> str:
        c = self.config
        ramp = "40% of train.steps" if c.rampup_steps is None else f"{c.rampup_steps} steps"
        return f"pi_model/consistency x {c.weight:g} after a sigmoid ramp-up over {ramp}; view={c.view}"

    def rampup_steps(self, total_steps: int) -> int:
        steps = self.config.rampup_steps
        return round(RAMPUP_FRACTION * total_steps) if steps is None else steps

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        batch.extras["pi_model/view2"] = ctx.augment(batch.raw_u, self.config.view)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx, forward):
        logits2 = forward(batch.extras["pi_model/view2"], update_bn=False)["logits"]
        ramp = sigmoid_rampup(ctx.step, self.rampup_steps(ctx.total_steps))
        return LossTerm("pi_model/consistency", consistency_mse(logits2, outputs.logits_u),
                        weight=self.config.weight * ramp)
