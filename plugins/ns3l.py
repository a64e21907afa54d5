"""NS3L: negative sampling in semi-supervised learning (Chen, Shah, Kyrillidis, ICML 2020; methods.md section 2).

Classes that a reference distribution gives less than a threshold T are "negative labels" of a row;
the loss -log(1 - sum of the negatives' probabilities) pushes their probability further down.
The negative set is computed from detached values (thresholding carries no gradient).

Two modes, chosen per step from the batch, with no code specific to any other plugin:

- Alone (`batch.y_u` is None): the negatives of an unlabeled row are the classes whose detached
  probability in the main forward (`outputs.logits_u`) is below T; the probabilities of the loss come
  from a second forward of a fresh weak view of the row (the official code re-augments), drawn in
  `ssl_modify_batch` and run with `update_bn=False` (batch statistics, running statistics untouched).
- Composed with a label-guessing plugin that sets soft targets `batch.y_u` (e.g. MixMatch): as the
  paper's MixMatch + NS3L (section 4.3-4.4), the loss runs on every row the guesser's losses use,
  unlabeled and labeled (`batch.y_l`, soft or int), the negatives of a row are the classes whose
  target is below T, and the probabilities are those of the same forward (`outputs.logits_u`,
  `outputs.logits_l`): no extra forward. List `ns3l` after the guesser in `plugins:` (otherwise
  it draws an unused view each step).

Loss weights (docs/fidelity.md):
- Alone (and next to VAT): the official loss is -(1/(B_l + B_u)) sum over unlabeled rows of log(...) (NS3L
  ns3l.py:25-26: the masked .mean() over the whole batch), added to the host's cross-entropy, also a sum over
  the labeled rows divided by B_l + B_u (perrying/realistic-ssl-evaluation-pytorch train.py:161). Against
  the core's labeled mean that is lambda * (B_u / B_l) * mean over unlabeled rows: the term "ns3l/unlabeled"
  has weight `weight * ramp * B_u / B_l` (the paper's lambda 1 alone, 0.3 with VAT, at B_l = B_u).
- Composed with a label guesser (MixMatch + NS3L): the paper adds lambda1 * L_NS to L_X + lambda_U L_U, with
  L_NS the mean over every mixed row X' and U' (methods.md 2b, from the ICML text; the official module
  averages over all the rows it is given), and L_X, our supervised loss, the mean over X'. So each row
  of X' and U' has weight lambda1 / (|X'| + |U'|): the term "ns3l/unlabeled" (one loss per row of x_u, so
  `ssl_unlabeled_weights`, e.g. DS3L, applies) has weight `weight * ramp * |U'| / (|X'| + |U'|)` and
  "ns3l/labeled" (weighted=False) `weight * ramp * |X'| / (|X'| + |U'|)`.

The threshold must be below 1/C (C: classes of the run, after any class-mismatch remapping), else the
argmax class itself can be negative and the clamp makes the loss a constant. C is known only once the
data is built, so it is checked in an `ssl_build_model` wrapper (which receives `num_classes`): still
at startup, before any step, and with the exact C of the run.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ssltrain import ConfigError, LossTerm, PluginContractError, SSLPlugin, Section, hookimpl, sigmoid_rampup


# --- the math: pure functions ------------------------------------------------------------------

def negative_mask(reference: Tensor, threshold: float) -> Tensor:
    """Negative labels N(u) = {k : reference_k < threshold}, bool [N, C], from a detached copy of
    `reference` (class probabilities or soft targets [N, C]). Carries no gradient."""
    return reference.detach() < threshold


def ns_loss(logits: Tensor, negatives: Tensor) -> Tensor:
    """Per row -log clamp(1 - sum_{k in N} softmax(logits)_k, 1e-8, 1), shape [N], >= 0 (official form).

    Equal to -log of the mass on the non-negative classes; 0 for a row without negatives.
    d/dz_k = p_k for k in N and p_k (1 - 1/S) <= 0 otherwise (S: mass on the non-negatives)."""
    p = logits.float().softmax(-1)
    return -torch.log((1 - (p * negatives).sum(-1)).clamp(1e-8, 1))


def default_threshold(num_classes: int) -> float:
    """0.4 / C: the official 0.04 at C = 10, scaled for other class counts (methods.md 2d)."""
    return 0.4 / num_classes


def check_threshold(threshold: float, num_classes: int) -> None:
    """Raise ConfigError unless threshold < 1/C (then the argmax class is never negative)."""
    if threshold >= 1 / num_classes:
        raise ConfigError(f"ns3l.threshold={threshold} must be below 1/C = 1/{num_classes} = {1 / num_classes:.4g} "
                          f"(C = number of classes of this run), otherwise every class can become negative; "
                          f"use e.g. ns3l.threshold={default_threshold(num_classes):.4g}")


# --- the plugin ----------------------------------------------------------------------------------

class NS3L(SSLPlugin):
    """The "ns3l/unlabeled" (and, next to a label guesser, "ns3l/labeled") loss terms. Defaults: NS3L
    alone (lambda 1, T = 0.4/C); with VAT the paper uses weight 0.3, with MixMatch weight 5 and T 0.05."""

    class Config(Section):
        weight: float = Field(1.0, ge=0, description="lambda_NS (lambda1): paper alone 1, with VAT 0.3, with MixMatch "
                                                     "5 (C10@250)")
        threshold: float | None = Field(None, gt=0, description="T; None: 0.4 / C (0.04 at C = 10, official); must be "
                                                                "< 1/C")
        rampup_steps: int = Field(0, ge=0, description="exp(-5 (1 - t)^2) ramp-up of the weight in steps (Oliver et "
                                                       "al.); 0: none")

    descriptions = {
        "ns3l/unlabeled": "weight * ramp * B_u/B_l alone or next to VAT (the official whole-batch average against "
                          "the labeled mean), weight * ramp * n_u/(n_l+n_u) next to a label guesser (the mean over "
                          "every mixed row), times the mean over the unlabeled rows of -log(1 - sum of the negative "
                          "classes' probabilities).",
        "ns3l/labeled": "weight * ramp * n_l/(n_l+n_u) * the same loss on the labeled rows (next to a label guesser).",
        "ns3l/negative_fraction": "Mean fraction of the classes marked negative per unlabeled row, in [0, 1].",
        "ns3l/true_class_negative": "Fraction of unlabeled rows (of a known class) whose hidden true class is marked "
                                    "negative, in [0, 1]: the negatives' error rate.",
        "ns3l/threshold": "T: a class with probability below T is a negative.",
        "ns3l/weight": "lambda_NS after the ramp-up at this step (before the batch-size conversion).",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.threshold: float | None = None  # T, resolved in ssl_build_model once C is known
        self.diagnostics: dict[str, Tensor] = {}

    def describe(self) -> str:
        c = self.config
        threshold = f"{c.threshold:g}" if c.threshold is not None else "0.4/C"
        return (f"ns3l/unlabeled x {c.weight:g} * B_u/B_l alone or next to VAT (x {c.weight:g} * n_u/(n_l+n_u), and "
                f"ns3l/labeled x {c.weight:g} * n_l/(n_l+n_u), next to a label guesser) after a ramp-up over "
                f"{c.rampup_steps} steps; threshold={threshold}")

    @hookimpl(wrapper=True)
    def ssl_build_model(self, num_classes):
        self.threshold = self.config.threshold if self.config.threshold is not None else default_threshold(num_classes)
        check_threshold(self.threshold, num_classes)
        return (yield)

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        if batch.y_u is None:  # alone: the view of the second forward, the same for every closure call
            batch.extras["ns3l/view"] = ctx.augment(batch.raw_u, "weak")

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx, forward):
        n_l, n_u = outputs.logits_l.shape[0], outputs.logits_u.shape[0]
        weight = self.config.weight * sigmoid_rampup(ctx.step, self.config.rampup_steps)
        if batch.y_u is not None:  # composed: targets of a label guesser, probabilities of the same forward
            neg_u = negative_mask(batch.y_u, self.threshold)
            loss_u = ns_loss(outputs.logits_u, neg_u)
            y_l = batch.y_l if batch.y_l.dim() == 2 else torch.nn.functional.one_hot(batch.y_l, ctx.num_classes)
            terms = [LossTerm("ns3l/unlabeled", loss_u, weight=weight * n_u / (n_l + n_u)),  # mean over X' and U'
                     LossTerm("ns3l/labeled", ns_loss(outputs.logits_l, negative_mask(y_l, self.threshold)),
                              weight=weight * n_l / (n_l + n_u), weighted=False)]
        else:  # alone: threshold the main forward, loss from a second forward of a new view
            view = batch.extras.get("ns3l/view")
            if view is None or view.shape[0] != n_u:
                raise PluginContractError(f"ns3l: the unlabeled rows ({n_u}) no longer match its view of raw_u "
                                          f"({None if view is None else view.shape[0]} rows): a plugin changed x_u "
                                          f"without setting soft targets batch.y_u")
            neg_u = negative_mask(outputs.logits_u.float().softmax(-1), self.threshold)
            loss_u = ns_loss(forward(view, update_bn=False)["logits"], neg_u)
            terms = [LossTerm("ns3l/unlabeled", loss_u, weight=weight * n_u / n_l)]  # official: over the whole batch
        if ctx.is_log_step:
            self.diagnostics = self._diagnose(neg_u, batch.y_u_hidden)
        return terms

    @staticmethod
    def _diagnose(negatives: Tensor, hidden: Tensor) -> dict[str, Tensor]:
        """Mean fraction of negative classes per unlabeled row, and how often the (hidden, diagnostic
        only) true class is among the negatives, over the rows of a known class."""
        seen = hidden >= 0
        wrong = negatives[seen].gather(1, hidden[seen].view(-1, 1)).float()
        return {"ns3l/negative_fraction": negatives.float().mean(),
                "ns3l/true_class_negative": wrong.mean() if wrong.numel() else torch.zeros(())}

    @hookimpl
    def ssl_metrics(self, ctx):
        return {**self.diagnostics, "ns3l/threshold": self.threshold,
                "ns3l/weight": self.config.weight * sigmoid_rampup(ctx.step, self.config.rampup_steps)}
