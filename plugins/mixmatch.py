"""MixMatch (Berthelot et al. 2019), faithful to google-research/mixmatch (methods.md section 1).

Per step: K weak views of each unlabeled sample; the current model (train mode, batch-norm running
statistics left untouched) guesses a label as the sharpened mean of the K predictions; labeled and
unlabeled views are MixUp-ed with a shuffled pool of both (per-row lambda' = max(lambda, 1 - lambda));
soft-target cross-entropy on the B mixed labeled rows (the core's supervised loss), and
lambda_u * ramp(t) * mean over rows and classes of (softmax(logits) - target)^2 on the K*B mixed
unlabeled rows. Weight decay is decoupled (`optim.name: adamw`), evaluation uses the EMA model.

Batch norm (`bn_mode`):
- "interleave" (official): forwards of B rows each (K+1 of them when B_u = B), rows swapped between
  them so that every forward sees labeled rows; only the first forward updates the running statistics.
- "concat": one forward over all (K+1)*B rows (the core default forward).

`distribution_alignment` (off by default: not part of MixMatch) adds ReMixMatch's fix for guesses that
drift away from a class (Berthelot et al. 2020): before sharpening, the mean guess is multiplied by
p_labeled / p_model and renormalised, where p_model is a running mean of the model's unlabeled
predictions and p_labeled the class marginal of the labeled rows seen so far.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ssltrain import (ConfigError, LossTerm, Outputs, PluginContractError, SSLPlugin, Section, all_reduce_mean,
                      hookimpl, linear_rampup)


# --- the math: pure functions ------------------------------------------------------------------

def sharpen(p: Tensor, T: float) -> Tensor:
    """Sharpen(p, T)_c = p_c^(1/T) / sum_c' p_c'^(1/T), row-wise over the last dim.
    T = 1 is the identity; T < 1 lowers the entropy, keeping argmax and ranking."""
    p = p.pow(1.0 / T)
    return p / p.sum(-1, keepdim=True)


def min_temperature(num_classes: int) -> float:
    """The smallest T for which Sharpen (in float32) keeps any distribution over C classes finite: its largest
    probability is >= 1/C, and (1/C)^(1/T) must stay above float32's smallest normal number (e^-87.3),
    otherwise every p^(1/T) underflows to 0 and the guess is 0/0 = NaN."""
    return math.log(num_classes) / -math.log(torch.finfo(torch.float32).tiny)


def check_temperature(key: str, temperature: float, num_classes: int) -> None:
    """A ConfigError naming `key` when `temperature` is below `min_temperature(num_classes)`."""
    bound = min_temperature(num_classes)
    if temperature < bound:
        raise ConfigError(f"{key}={temperature:g} is below {bound:.4g} = ln(C) / 87.3 for C = {num_classes} "
                          f"classes: sharpening raises probabilities to 1/T in float32, where every guess would "
                          f"underflow to 0/0; use {key} >= {bound:.4g} (official: 0.5)")


def guess_labels(probs: list[Tensor], T: float) -> Tensor:
    """q = Sharpen(mean_k probs[k], T), detached: one target [B, C] shared by the K views."""
    return sharpen(torch.stack(probs).mean(0), T).detach()


def align_distribution(q: Tensor, p_model: Tensor, p_target: Tensor) -> Tensor:
    """ReMixMatch's distribution alignment: q'_c proportional to q_c * p_target_c / p_model_c, rows
    renormalised. q: [B, C] distributions; p_model, p_target: [C]. p_model == p_target is the identity."""
    q = q * (p_target / p_model.clamp(min=1e-6))
    return q / q.sum(-1, keepdim=True)


def mix_weights(n: int, alpha: float, device=None) -> Tensor:
    """Per-row MixUp weights lambda' = max(lambda, 1 - lambda), lambda ~ Beta(alpha, alpha): [n], >= 0.5."""
    concentration = torch.full((n,), float(alpha), device=device)
    lam = torch.distributions.Beta(concentration, concentration).sample()
    return torch.maximum(lam, 1 - lam)


def mixup(x: Tensor, p: Tensor, lam: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """Row i mixed with row perm[i] of the same pool: x'_i = lam_i x_i + (1 - lam_i) x_perm[i], same for p.

    x: [N, ...], p: [N, C], lam: [N] (>= 0.5 keeps row i dominated by itself), perm: a permutation of
    range(N). Rows of p that sum to 1 still sum to 1. Returns (x', p').
    """
    lx = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    lp = lam.view(-1, 1).to(p.dtype)
    return lx * x + (1 - lx) * x[perm], lp * p + (1 - lp) * p[perm]


def interleave_offsets(batch: int, nu: int) -> list[int]:
    """Cut points of a batch into nu + 1 near-equal groups, larger groups last
    (batch=64, nu=2 -> [0, 21, 42, 64])."""
    groups = [batch // (nu + 1)] * (nu + 1)
    for i in range(batch - sum(groups)):
        groups[-i - 1] += 1
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g)
    return offsets


def interleave(xs: list[Tensor], batch: int) -> list[Tensor]:
    """Swap group i of xs[0] with group i of xs[i] (i = 1..nu), as the official `interleave`.
    Every one of the nu + 1 tensors has `batch` rows. An involution: interleave(interleave(xs)) == xs."""
    nu = len(xs) - 1
    offsets = interleave_offsets(batch, nu)
    parts = [[x[offsets[g]:offsets[g + 1]] for g in range(nu + 1)] for x in xs]
    for i in range(1, nu + 1):
        parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
    return [torch.cat(p) for p in parts]


def l2_per_row(logits: Tensor, targets: Tensor) -> Tensor:
    """(1/C) ||softmax(logits) - targets||^2 per row, shape [N]; in [0, 2/C] for distributions."""
    return (logits.float().softmax(-1) - targets).pow(2).mean(-1)


def mix_into_batch(batch, x_l: Tensor, y_l: Tensor, views: list[Tensor], q: Tensor, alpha: float) -> None:
    """MixUp of one pool: the labeled rows x_l (targets y_l [B, C]) and the unlabeled views (each
    [B_u, ...], all with the target q [B_u, C]), each row mixed with a random row of the pool
    (`mix_weights`, `mixup`). Writes the mixed labeled rows to batch.x_l/y_l and the mixed views,
    view-major, to batch.x_u/y_u, and tiles y_u_hidden and idx_u to stay row-aligned."""
    x_all, p_all = torch.cat([x_l, *views]), torch.cat([y_l, q.repeat(len(views), 1)])
    n, b = x_all.shape[0], x_l.shape[0]
    x_mix, p_mix = mixup(x_all, p_all, mix_weights(n, alpha, x_all.device), torch.randperm(n, device=x_all.device))
    batch.x_l, batch.y_l = x_mix[:b], p_mix[:b]
    batch.x_u, batch.y_u = x_mix[b:], p_mix[b:]
    batch.y_u_hidden = batch.y_u_hidden.repeat(len(views))
    batch.idx_u = batch.idx_u.repeat(len(views))


def interleaved_forward(forward, x_l: Tensor, x_u: Tensor) -> Outputs:
    """The official batch-norm handling of MixMatch and ReMixMatch: forwards of B = len(x_l) rows each,
    rows swapped between them (`interleave`) so that every forward sees labeled rows; only the first
    forward updates the running statistics. len(x_u) must be a multiple of B."""
    b, n_u = x_l.shape[0], x_u.shape[0]
    if n_u % b:
        raise PluginContractError(f"interleaved forward: {n_u} unlabeled rows are not a multiple of the {b} labeled "
                                  f"rows (did another plugin change the batch?); use bn_mode=concat")
    chunks = interleave([x_l, *x_u.split(b)], b)
    outs = [forward(c, update_bn=i == 0) for i, c in enumerate(chunks)]
    merged = {k: interleave([o[k] for o in outs], b) for k in outs[0]}
    logits = merged.pop("logits")
    return Outputs(logits_l=logits[0], logits_u=torch.cat(logits[1:]),
                   extras_l={k: v[0] for k, v in merged.items()},
                   extras_u={k: torch.cat(v[1:]) for k, v in merged.items()})


def one_hot_targets(y: Tensor, num_classes: int) -> Tensor:
    """Int labels [B] -> float one-hot [B, C]; soft targets [B, C] are returned as float."""
    return (y if y.dim() == 2 else torch.nn.functional.one_hot(y, num_classes)).float()


class DistributionAlignment:
    """ReMixMatch's distribution alignment with its running marginals (Berthelot et al. 2020).

    `__call__(probs, y_l)` aligns a batch of predictions [B, C] with `align_distribution`, where
    p_model is a running mean (EMA, `momentum`) of the batch-mean predictions and p_target the class
    marginal of every labeled row seen so far, then folds the batch into both estimates. The marginals
    live on the device and are averaged over processes (every rank keeps the same state); they are
    checkpointed through `state_dict` / `load_state_dict`."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.p_model: Tensor | None = None  # running mean of the unlabeled predictions, [C]
        self.label_counts: Tensor | None = None  # labeled rows seen per class, [C]

    def __call__(self, probs: Tensor, y_l: Tensor) -> Tensor:
        if self.p_model is None:
            self.p_model = torch.full_like(probs[0], 1.0 / probs.shape[1])
            self.label_counts = torch.zeros_like(probs[0])
        self.p_model, self.label_counts = self.p_model.to(probs.device), self.label_counts.to(probs.device)
        labels, guesses = all_reduce_mean(torch.stack([y_l.sum(0), probs.mean(0)]))  # one collective
        self.label_counts += labels
        aligned = align_distribution(probs, self.p_model, self.label_counts / self.label_counts.sum())
        self.p_model.lerp_(guesses, 1 - self.momentum)
        return aligned

    def state_dict(self) -> dict | None:
        return None if self.p_model is None else {"p_model": self.p_model, "label_counts": self.label_counts}

    def load_state_dict(self, saved: dict | None) -> None:
        if saved is not None:
            self.p_model, self.label_counts = saved["p_model"].clone(), saved["label_counts"].clone()


# --- the plugin ----------------------------------------------------------------------------------

def guess_descriptions(plugin: str) -> dict[str, str]:
    """TensorBoard descriptions of `guess_diagnostics`' values, under `plugin`/."""
    return {f"{plugin}/guess_acc_pct": "Share of the unlabeled batch whose guessed class (argmax of the sharpened "
                                       "guess) is the hidden true label, in % (rows of unknown class excluded).",
            f"{plugin}/guess_max": "Mean over the unlabeled batch of the sharpened guess's largest probability, in "
                                   "[0, 1].",
            f"{plugin}/guess_min_class_share": "C times the smallest class share of the guesses: 1 balanced, 0 a "
                                               "class never guessed."}


def guess_diagnostics(plugin: str, q: Tensor, hidden: Tensor) -> dict[str, Tensor]:
    """The values `guess_descriptions` describes, from guesses q [B_u, C] and the hidden labels [B_u] (-1 unknown)."""
    seen = hidden >= 0
    hits = (q.argmax(-1) == hidden) & seen
    return {f"{plugin}/guess_acc_pct": 100 * hits.sum() / seen.sum().clamp(min=1),
            f"{plugin}/guess_max": q.max(-1).values.mean(),
            f"{plugin}/guess_min_class_share": q.mean(0).min() * q.shape[1]}


class GuessAndMixConfig(Section):
    """Settings MixMatch and ReMixMatch share."""
    T: float = Field(0.5, gt=0, le=1, description="Sharpening temperature")
    alpha: float = Field(0.75, gt=0, description="Beta(alpha, alpha) of MixUp")
    bn_mode: Literal["interleave", "concat"] = Field("interleave", description="Batch norm: interleave "
                                                     "(official, chunked forwards) or concat (one forward)")
    alignment_momentum: float = Field(0.99, ge=0, lt=1, description="Running mean of p_model (ReMixMatch: a "
                                                                    "128-batch window)")


class GuessAndMix(SSLPlugin):
    """What MixMatch and ReMixMatch share: distribution alignment (`self.alignment`, in checkpoints), the
    interleaved forward of `bn_mode` and the guess diagnostics (`self.diagnostics`)."""

    def __init__(self, config=None):
        super().__init__(config)
        self.diagnostics: dict[str, Tensor] = {}  # at log steps: guess_diagnostics
        self.alignment = DistributionAlignment(self.config.alignment_momentum)

    @hookimpl
    def ssl_state_dict(self, state):
        saved = self.alignment.state_dict()
        if saved is not None:
            state[self.name] = saved

    @hookimpl
    def ssl_load_state_dict(self, state):
        self.alignment.load_state_dict(state.get(self.name))

    @hookimpl
    def ssl_forward(self, batch, forward):
        if self.config.bn_mode == "concat" or batch.x_u.shape[0] == 0:
            return None  # the core default: one forward over cat(x_l, x_u)
        return interleaved_forward(forward, batch.x_l, batch.x_u)


class MixMatch(GuessAndMix):
    """Label guessing + MixUp in `ssl_modify_batch`, the interleaved forward in `ssl_forward`,
    and the "mixmatch/l2" unlabeled term. Defaults are the official CIFAR-10 values."""

    incompatible = {"sla": "sla trains N*M joint (transformation, class) logits, mixmatch guesses and mixes "
                           "N-class targets"}
    descriptions = {
        "mixmatch/l2": "lambda_u * ramp * mean over the K*B mixed unlabeled rows of (1/C)||softmax - target||^2.",
        **guess_descriptions("mixmatch"),
        "mixmatch/lambda_u": "The weight of mixmatch/l2 at this step (lambda_u after the linear ramp-up).",
    }

    class Config(GuessAndMixConfig):
        K: int = Field(2, ge=1, description="Augmented views per unlabeled sample")
        lambda_u: float = Field(75.0, ge=0, description="Weight of the L2 term after the ramp-up")
        rampup_steps: int = Field(16384, ge=0, description="Linear ramp of lambda_u (16384 steps = 1024 kimg at B=64)")
        distribution_alignment: bool = Field(False, description="ReMixMatch's alignment of the guesses (not in "
                                                                "MixMatch)")

    @property
    def p_model(self) -> Tensor | None:
        return self.alignment.p_model

    @property
    def label_counts(self) -> Tensor | None:
        return self.alignment.label_counts

    def describe(self) -> str:
        c = self.config
        return (f"mixmatch/l2 x {c.lambda_u:g} after a linear ramp-up over {c.rampup_steps} steps; K={c.K}, T={c.T}, "
                f"alpha={c.alpha}, bn_mode={c.bn_mode}" + (", distribution_alignment" if c.distribution_alignment else ""))

    @hookimpl
    def ssl_configure(self, config, plugins):
        if "flowgmm" in plugins:
            warnings.warn("mixmatch with flowgmm: MixUp of inputs through a normalizing flow is unvalidated",
                          stacklevel=2)
        data, k = config.data, self.config.K
        if self.config.bn_mode == "interleave" and (k * data.unlabeled_batch_size) % data.batch_size:
            raise ConfigError(f"mixmatch.bn_mode=interleave forwards chunks of data.batch_size rows, so "
                              f"K * data.unlabeled_batch_size ({k} * {data.unlabeled_batch_size}) must be a multiple "
                              f"of data.batch_size ({data.batch_size}); change the batch sizes or use "
                              f"mixmatch.bn_mode=concat")

    @hookimpl(wrapper=True)
    def ssl_build_model(self, num_classes):
        check_temperature("mixmatch.T", self.config.T, num_classes)
        return (yield)

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        cfg = self.config
        views = [ctx.augment(batch.raw_u, "weak") for _ in range(cfg.K)]
        with torch.no_grad():  # the official code drops the guessing forwards' BN updates
            probs = [ctx.predict(v, update_bn=False).float().softmax(-1) for v in views]
        y_l = one_hot_targets(batch.y_l, ctx.num_classes)
        if cfg.distribution_alignment:
            probs = [self.alignment(torch.stack(probs).mean(0), y_l)]
        q = guess_labels(probs, cfg.T)
        mix_into_batch(batch, batch.x_l, y_l, views, q, cfg.alpha)
        batch.extras["mixmatch/views"] = torch.cat(views)  # un-mixed views, view-major [K*B_u, ...]
        batch.extras["mixmatch/pseudo_labels"] = q  # sharpened guesses [B_u, C] of raw_u (TensorBoard shows them)
        if ctx.is_log_step:
            self.diagnostics = guess_diagnostics("mixmatch", q, batch.y_u_hidden[: q.shape[0]])

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx):
        weight = self.config.lambda_u * linear_rampup(ctx.step, self.config.rampup_steps)
        return LossTerm("mixmatch/l2", l2_per_row(outputs.logits_u, batch.y_u), weight=weight)

    @hookimpl
    def ssl_metrics(self, ctx):
        return {**self.diagnostics,
                "mixmatch/lambda_u": self.config.lambda_u * linear_rampup(ctx.step, self.config.rampup_steps)}
