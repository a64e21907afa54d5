"""VAT: virtual adversarial training (Miyato et al. 2018), as the host of the NS3L paper's main tables:
the VAT of Oliver et al.'s codebase (brain-research/realistic-ssl-evaluation; its PyTorch port
perrying/realistic-ssl-evaluation-pytorch, for which NS3L's official loss module is written).

Per unlabeled row: the perturbation r_adv of L2 norm epsilon that most changes the prediction, found
by power iteration (random unit d; d <- normalise(grad_d KL(p(x) || p(x + xi d))), `iterations` times;
perrying lib/algs/vat.py:25-33, brain-research third_party/vat/vat_utils.py:17-27), and the loss
KL(p(x + r_adv) || sg p(x)), the perturbed prediction first, as the official code (perrying
lib/algs/vat.py:36-40; brain-research lib/ssl_framework.py:254-262 with "forward_kl", lib/ssl_utils.py:100-101;
Miyato's original has the other order, brain-research issue #27). The clean prediction is the main
forward's (detached). The KL term is ramped with exp(-5 (1 - t)^2) (perrying train.py:152).
Optional entropy minimisation (VAT + EntMin): the entropy of the main forward's prediction, not ramped
(perrying train.py:165-166).

Loss weights (docs/fidelity.md). The official loss is (sum over labeled rows of CE + w(t) lambda * sum over
unlabeled rows of KL [+ em * sum of entropies]) / (B_l + B_u): perrying train.py:161 (cross_entropy with
ignore_index, .mean() over the whole batch), lib/algs/vat.py:40 and train.py:166 (masked .mean() over the
whole batch); brain-research lib/ssl_framework.py:125-130 and lib/ssl_utils.py:109-111. Divided by
B_l / (B_l + B_u) (a factor of the whole loss, which Adam's update ignores), that is mean_l CE +
lambda * w(t) * (B_u / B_l) * mean_u KL. So the terms' weights here are `weight * ramp * B_u / B_l` and
`entmin_weight * B_u / B_l` against the core's labeled mean: the official lambda 0.3 trains 0.3 at
B_l = B_u, as in the official 50 + 50 batches.

Precision: the power iteration differentiates changes of order xi (1e-6) in the input, which bf16 (8 bits
of mantissa) rounds away: under `train.amp` it runs in float32 (`forward(..., autocast=False)`), from a
float32 clean prediction of the same rows (one extra forward, only under autocast). The final perturbed
forward (a change of norm epsilon) runs in the run's precision. xi below float32's resolution (2^-23) is
a startup error: x + xi d would round back to x for every input entry of magnitude >= 1.

Forwards: the perturbed forwards run over cat(x_l, x_u + r), the rows of the core's default forward,
so batch norm normalises them with the same batch composition as the clean prediction (at r = 0 the
KL is 0). Only the unlabeled rows are perturbed (the official code perturbs the whole batch and masks
the labeled rows out of the loss: the same loss, up to the labeled rows' share of the batch statistics).
They run with `update_bn=False`: batch statistics, running statistics untouched.

epsilon and xi live in the model's input space: normalised images ((x - mean) / std per channel) or
standardised vectors, so epsilon is an L2 norm over all input dimensions in units of the data's std.
The official CIFAR-10 epsilon 6.0 is in a ZCA-whitened 3072-dim space (an rms of 6 / sqrt(3072) = 0.108
per dimension); the same rms over a 28x28 image is epsilon = 3.0. The official xi = 1e-6 (the default)
is at the edge of float32 resolution: x + xi d is mostly rounded back to x (d has ~1/sqrt(D) entries).
Measured once on a fresh width-16 small_cnn, 128 normalised 28x28 rows, epsilon 3: the mean KL at
r_adv is 0.0032 with xi = 1e-6, 0.0051 with xi in 1e-3..1, 0.00006 for a random direction.
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field
from torch import Tensor

from ssltrain import ConfigError, LossTerm, SSLPlugin, Section, hookimpl, sigmoid_rampup


# --- the math: pure functions ------------------------------------------------------------------

#: float32's relative resolution: below it, x + xi d == x for every entry |x| >= 1 whatever the unit d
FLOAT32_EPS = 2.0 ** -23


def kl_div(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) per row, shape [N], >= 0 (float32).
    Differentiable in both arguments: the caller detaches the one that is a fixed target."""
    log_p, log_q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def entropy(logits: Tensor) -> Tensor:
    """H(softmax(logits)) per row, shape [N], in [0, log C]."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def normalize_rows(v: Tensor) -> Tensor:
    """Each row of v (over all non-batch dims) scaled to L2 norm ~1, as the official code: first divided
    by its max |v| (so tiny gradients do not underflow), then by sqrt(1e-6 + ||v||^2). A zero row stays 0."""
    flat = v.flatten(1)
    flat = flat / (flat.abs().amax(1, keepdim=True) + 1e-12)
    flat = flat / (flat.pow(2).sum(1, keepdim=True) + 1e-6).sqrt()
    return flat.view_as(v)


def adversarial_perturbation(logits_fn: Callable[[Tensor], Tensor], x: Tensor, clean_logits: Tensor,
                             xi: float, epsilon: float, iterations: int = 1) -> Tensor:
    """r_adv, same shape as x, each row of L2 norm epsilon (0 where the KL does not depend on the row).

    logits_fn(x') -> logits [N, C] of the rows of x'; clean_logits [N, C] (detached here). Power
    iteration: d random unit; `iterations` times d <- normalise(grad_d sum KL(clean || logits_fn(x + xi d))).
    Gradients are taken with respect to d only (nothing accumulates in parameters). Returns a detached tensor."""
    clean = clean_logits.detach()
    d = normalize_rows(torch.randn_like(x))
    for _ in range(iterations):
        d.requires_grad_(True)
        kl = kl_div(clean, logits_fn(x + xi * d)).sum()
        (grad,) = torch.autograd.grad(kl, [d], allow_unused=True)
        d = normalize_rows(grad if grad is not None else torch.zeros_like(x))
    return epsilon * d.detach()


# --- the plugin ----------------------------------------------------------------------------------

class VAT(SSLPlugin):
    """The "vat/kl" term (and "vat/entmin" when entmin_weight > 0). Defaults: the official VAT host
    coefficients (lambda 0.3, xi 1e-6, one power iteration) and its CIFAR-10 epsilon 6.0."""

    class Config(Section):
        weight: float = Field(0.3, ge=0, description="lambda_VAT of the official code (0.3 on 10-class data, 0.6 on "
                                                    "CIFAR-100); trained as weight * B_u/B_l against the labeled mean")
        epsilon: float = Field(6.0, gt=0, description="L2 norm of r_adv per row, in the (normalised) input space")
        xi: float = Field(1e-6, gt=0, description="Finite-difference step of the power iteration (float32); >= 2^-23")
        iterations: int = Field(1, ge=1, description="Power iterations")
        entmin_weight: float = Field(0.0, ge=0, description="Entropy minimisation (VAT + EntMin: 0.06), not ramped; "
                                                           "0: off")
        rampup_steps: int = Field(0, ge=0, description="exp(-5 (1 - t)^2) ramp-up of the KL term in steps; 0: none")

    descriptions = {
        "vat/kl": "weight * B_u/B_l * ramp * mean over the unlabeled rows of KL(p(x + r_adv) || p(x)) (the official "
                  "whole-batch average against the labeled mean).",
        "vat/entmin": "entmin_weight * B_u/B_l * mean entropy of the unlabeled predictions (not ramped).",
    }

    def describe(self) -> str:
        c = self.config
        text = f"vat/kl x {c.weight:g} * B_u/B_l"
        if c.entmin_weight:
            text += f", vat/entmin x {c.entmin_weight:g} * B_u/B_l (not ramped)"
        return (text + f" (the official whole-batch average) after a ramp-up over {c.rampup_steps} steps; "
                       f"epsilon={c.epsilon:g}, xi={c.xi:g}")

    @hookimpl
    def ssl_configure(self):
        if self.config.xi < FLOAT32_EPS:
            raise ConfigError(f"vat.xi={self.config.xi:g} is below float32's resolution 2^-23 = {FLOAT32_EPS:.3g}: "
                              f"x + xi d rounds back to x and the power iteration differentiates rounding noise; "
                              f"use vat.xi >= {FLOAT32_EPS:.3g} (official: 1e-6)")

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx, forward):
        cfg = self.config
        n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
        per_labeled_mean = n_u / n_l  # official: both sums over the whole batch (module docstring)

        def perturbed(x_u, autocast=True):  # the unlabeled rows' logits, forwarded alongside the clean labeled rows
            return forward(torch.cat([batch.x_l, x_u]), update_bn=False, autocast=autocast)["logits"][n_l:]

        clean = outputs.logits_u.detach()
        exact = clean
        if ctx.amp_dtype is not None:  # the power iteration's target in float32 too, from the same rows
            with torch.no_grad():
                exact = perturbed(batch.x_u, autocast=False)
        r_adv = adversarial_perturbation(lambda x_u: perturbed(x_u, autocast=False), batch.x_u, exact,
                                         cfg.xi, cfg.epsilon, cfg.iterations)
        ramp = sigmoid_rampup(ctx.step, cfg.rampup_steps)
        terms = [LossTerm("vat/kl", kl_div(perturbed(batch.x_u + r_adv), clean),
                          weight=cfg.weight * ramp * per_labeled_mean)]
        if cfg.entmin_weight > 0:
            terms.append(LossTerm("vat/entmin", entropy(outputs.logits_u),
                                  weight=cfg.entmin_weight * per_labeled_mean))
        return terms
