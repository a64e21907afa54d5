"""Pseudo-Label (Lee 2013), as in USB (microsoft/Semi-supervised-learning at 1ef4cbe)
semilearn/algorithms/pseudolabel/pseudolabel.py (U): hard labels above a confidence threshold on the same view.

Per step:
- two forwards (U:48-57): the labeled rows (batch norm updates its running statistics), then the unlabeled rows
  with the running statistics left untouched (USB's Bn_Controller backs them up and restores them,
  core/utils/misc.py:115-129; here `forward(x_u, update_bn=False)`: batch statistics, running ones unchanged);
- pseudo-label: argmax of sg(softmax(logits_u)) of the SAME forward (U:64-69, hooks/pseudo_label.py:37-40), kept
  where its max probability >= tau (hooks/masking.py:55-56);
- unlabeled term: mean over the unlabeled rows of mask * CE(logits_u, pseudo-label) (U:71-74), times
  lambda_u * ramp, ramp = clip(t / (warmup * T), 0, 1), t the step, T the steps (U:76-77).
Same normalisation as the official total (sup_loss + lambda_u * unsup_loss * ramp, both means): `lambda_u`
unchanged. The gradient flows through the logits of the loss, never through the label or the mask.

Defaults (U:35-37, 86-92, USB config/classic_cv/pseudolabel/pseudolabel_cifar10_40_0.yaml): tau 0.95,
lambda_u 1, warm-up over the first 40% of the steps, uratio 1 (data.unlabeled_batch_size = data.batch_size).
`outputs.y_u` is softmax(logits_u) (detached): NS3L takes its negatives from it.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ssltrain import LossTerm, Outputs, SSLPlugin, Section, hookimpl, linear_rampup

from ssltrain_plugins.pseudo_labeling import (check_unlabeled_ratio, class_probs, confidence_mask, diagnostics,
                                              guessers_except, pseudo_label_loss)


class PseudoLabel(SSLPlugin):
    """The "pseudo_label/unlabeled" term: mask * CE(logits_u, argmax of the same prediction)."""

    incompatible = guessers_except("pseudo_label")

    class Config(Section):
        threshold: float = Field(0.95, gt=0, le=1, description="Tau: keep a row whose max probability is at least this.")
        lambda_u: float = Field(1.0, ge=0, description="Weight of the unlabeled term after the warm-up.")
        warmup: float = Field(0.4, ge=0, le=1, description="Linear ramp of lambda_u over this fraction of train.steps.")

    def __init__(self, config=None):
        super().__init__(config)
        self.diagnostics: dict[str, torch.Tensor] = {}

    @hookimpl
    def ssl_configure(self, config):
        check_unlabeled_ratio(config, self.name)

    def ramp(self, ctx) -> float:
        return linear_rampup(ctx.step, round(self.config.warmup * ctx.total_steps))

    @hookimpl
    def ssl_forward(self, batch, forward):
        out_l = forward(batch.x_l)
        out_u = forward(batch.x_u, update_bn=False) if batch.x_u.shape[0] else {k: v[:0] for k, v in out_l.items()}
        logits_l, logits_u = out_l.pop("logits"), out_u.pop("logits")
        return Outputs(logits_l=logits_l, logits_u=logits_u, extras_l=out_l, extras_u=out_u,
                       y_u=class_probs(logits_u) if logits_u.shape[0] else None)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx):
        probs = class_probs(outputs.logits_u)
        mask = confidence_mask(probs, self.config.threshold)
        if ctx.is_log_step:
            self.diagnostics = diagnostics(self.name, probs, mask, batch.y_u_hidden)
        return LossTerm("pseudo_label/unlabeled", pseudo_label_loss(outputs.logits_u, probs.argmax(-1), mask),
                        weight=self.config.lambda_u * self.ramp(ctx))

    @hookimpl
    def ssl_metrics(self, ctx):
        return {**self.diagnostics, "pseudo_label/lambda_u": self.config.lambda_u * self.ramp(ctx)}
