"""VAT: virtual adversarial training (Miyato et al. 2018), as the host of the NS3L paper's main tables
(the VAT of Oliver et al.'s codebase, perrying/realistic-ssl-evaluation-pytorch; methods.md 2c-2d).

Per unlabeled row: the perturbation r_adv of L2 norm epsilon that most changes the prediction, found
by power iteration (random unit d; d <- normalise(grad_d KL(p(x) || p(x + xi d))), `iterations` times),
and the loss KL(p(x) || p(x + r_adv)), with the clean prediction p(x) detached (the main forward's
logits). Optional entropy minimisation (VAT + EntMin): the entropy of the main forward's prediction.
Both terms are ramped with exp(-5 (1 - t)^2) (Oliver et al.; the official code ramps both with the
same w(t), as far as read).

Forwards: the perturbed forwards run over cat(x_l, x_u + r), the rows of the core's default forward,
so batch norm normalises them with the same batch composition as the clean prediction (at r = 0 the
KL is 0; the official code also forwards the whole batch). Only the unlabeled rows are perturbed.
They run with `update_bn=False`: batch statistics, running statistics untouched.

epsilon and xi live in the model's input space: normalised images ((x - mean) / std per channel) or
standardised vectors, so epsilon is an L2 norm over all input dimensions in units of the data's std.
The official CIFAR-10 epsilon 6.0 is in a ZCA-whitened 3072-dim space (an rms of 6 / sqrt(3072) = 0.108
per dimension); the same rms over a 28x28 image is epsilon = 3.0. The official xi = 1e-6 (the default)
is at the edge of float32 resolution: x + xi d is mostly rounded back to x (d has ~1/sqrt(D) entries).
Measured once on a fresh width-16 small_cnn, 128 normalised 28x28 rows, epsilon 3: the mean KL at
r_adv is 0.0032 with xi = 1e-6, 0.0051 with xi in 1e-3..1, 0.00006 for a random direction.

Batch averaging, as the official code and NS3L here: `weight * ramp * (sum over unlabeled rows) /
(B_l + B_u)` (the official mean runs over the whole batch with the labeled rows masked to zero: with
50/50 batches each unlabeled row has weight 0.5), so the paper's coefficients carry over.
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field
from torch import Tensor

from ssltrain import LossTerm, SSLPlugin, Section, hookimpl, sigmoid_rampup


# --- the math: pure functions ------------------------------------------------------------------

def kl_div(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) per row, shape [N], >= 0 (float32).
    The caller detaches p_logits when it is the target."""
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
    coefficients (weight 0.3, xi 1e-6, one power iteration) and its CIFAR-10 epsilon 6.0."""

    class Config(Section):
        weight: float = Field(0.3, ge=0, description="lambda_VAT (0.3 on 10-class data, 0.6 on CIFAR-100)")
        epsilon: float = Field(6.0, gt=0, description="L2 norm of r_adv per row, in the (normalised) input space")
        xi: float = Field(1e-6, gt=0, description="Finite-difference step of the power iteration")
        iterations: int = Field(1, ge=1, description="Power iterations")
        entmin_weight: float = Field(0.0, ge=0, description="Entropy minimisation (VAT + EntMin: 0.06); 0: off")
        rampup_steps: int = Field(0, ge=0, description="exp(-5 (1 - t)^2) ramp-up in steps; 0: none")

    descriptions = {
        "vat/kl": "weight * B_u/(B_l+B_u) * ramp * mean over the unlabeled rows of KL(p(x) || p(x + r_adv)).",
        "vat/entmin": "entmin_weight * B_u/(B_l+B_u) * ramp * mean entropy of the unlabeled predictions.",
    }

    def describe(self) -> str:
        c = self.config
        text = f"vat/kl x {c.weight:g} * B_u/(B_l+B_u)"
        if c.entmin_weight:
            text += f", vat/entmin x {c.entmin_weight:g} * B_u/(B_l+B_u)"
        return (text + f" (the official mean over all rows) after a ramp-up over {c.rampup_steps} steps; "
                       f"epsilon={c.epsilon:g}, xi={c.xi:g}")

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx, forward):
        cfg = self.config
        n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
        scale = sigmoid_rampup(ctx.step, cfg.rampup_steps) * n_u / (n_l + n_u)

        def perturbed(x_u):  # the unlabeled rows' logits, forwarded alongside the clean labeled rows
            return forward(torch.cat([batch.x_l, x_u]), update_bn=False)["logits"][n_l:]

        clean = outputs.logits_u.detach()
        r_adv = adversarial_perturbation(perturbed, batch.x_u, clean, cfg.xi, cfg.epsilon, cfg.iterations)
        terms = [LossTerm("vat/kl", kl_div(clean, perturbed(batch.x_u + r_adv)), weight=cfg.weight * scale)]
        if cfg.entmin_weight > 0:
            terms.append(LossTerm("vat/entmin", entropy(outputs.logits_u), weight=cfg.entmin_weight * scale))
        return terms
