"""Pi-model (Laine & Aila 2017; the base loss DS3L weights, methods.md section 3b).

Consistency between two stochastic views of each unlabeled sample: the squared distance between
the class probabilities of a second view and the (detached) probabilities of the first.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ssltrain import LossTerm, SSLPlugin, Section, hookimpl, sigmoid_rampup


def consistency_mse(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Per sample (1/C) * ||softmax(logits) - sg(softmax(target_logits))||^2, shape [N]."""
    target = target_logits.detach().float().softmax(-1)
    return (logits.float().softmax(-1) - target).pow(2).mean(-1)


class PiModel(SSLPlugin):
    """Adds "pi_model/consistency": weight * ramp(step) * mean over unlabeled samples of Omega."""

    descriptions = {"pi_model/consistency": "weight * ramp * mean over the unlabeled rows of (1/C)||softmax(view 2) "
                                            "- softmax(view 1)||^2."}

    class Config(Section):
        weight: float = Field(10.0, ge=0, description="Maximum weight of the consistency term")
        rampup_steps: int = Field(0, ge=0, description="exp(-5 (1 - t)^2) ramp-up length in steps; 0: no ramp")
        view: Literal["weak", "strong"] = Field("weak", description="Augmentation of the second view")

    def describe(self) -> str:
        c = self.config
        return (f"pi_model/consistency x {c.weight:g} after a sigmoid ramp-up over {c.rampup_steps} steps; "
                f"view={c.view}")

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        batch.extras["pi_model/view2"] = ctx.augment(batch.raw_u, self.config.view)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx, forward):
        logits2 = forward(batch.extras["pi_model/view2"], update_bn=False)["logits"]
        ramp = sigmoid_rampup(ctx.step, self.config.rampup_steps)
        return LossTerm("pi_model/consistency", consistency_mse(logits2, outputs.logits_u),
                        weight=self.config.weight * ramp)
