"""Shared pieces of the pseudo-labeling family (FixMatch, FlexMatch, FreeMatch, SoftMatch, UDA, Pseudo-Label;
reusable by ReMixMatch, Mean Teacher and any plugin of the same shape). Not a plugin itself.

Official sources (file:line): google-research/fixmatch fixmatch.py (F); microsoft/Semi-supervised-learning at
1ef4cbe (USB): semilearn/algorithms/hooks/masking.py (M), hooks/pseudo_label.py (P), flexmatch/utils.py (X),
core/criterions/consistency.py (C).

API (stable; plugin code calls these, tests pin them)
-----------------------------------------------------
Views and the one forward (F:89-104: the weak and the strong view of each unlabeled row go through ONE forward
with the labeled rows, cat(x_l, u_weak, u_strong), in train mode, and are split back):

- `add_strong_view(batch, ctx)`, in `ssl_modify_batch`: the core's view of the unlabeled rows
  (`data.augment.unlabeled_view`, "weak" by default) becomes the weak view `batch.extras[WEAK]`, and `batch.x_u`
  becomes a strong view `ctx.augment(batch.raw_u, "strong")`. The rows the unlabeled loss is on are then the
  strong ones: `outputs.logits_u` are the strong view's logits, so `ssl_unlabeled_weights` (DS3L) and composed
  plugins (NS3L) see the rows the loss trains. `y_u_hidden` and `idx_u` stay aligned (one row per sample).
- `forward_weak_strong(batch, forward) -> Outputs`, in `ssl_forward`: one `forward(cat(x_l, weak, x_u))`;
  `logits_l`, `logits_u` (strong), model extras of those rows, and the weak rows' logits, detached and float32,
  in `outputs.extras_u[WEAK_LOGITS]` (the pseudo-label carries no gradient, F:113). With no unlabeled rows (a
  labeled-only closure, e.g. DS3L's meta loss) it forwards x_l alone. The weak view may have another row count
  than x_u (e.g. K strong views per sample): rows are split by the weak view's length.
- `check_strong_view(config, data, plugin)`: ConfigError at startup, naming the key, its value and the fix, when
  the strong view would be no stronger than the weak one (vectors: `data.augment.strong_noise_std` not above
  `data.augment.noise_std`; images: `num_ops` 0 and `cutout` 0). The family's base calls it.
- `check_unlabeled_ratio(config, plugin)`: ConfigError at startup, naming both keys, their values and a fix, when
  `data.unlabeled_batch_size` is not a multiple of `data.batch_size` (the official uratio is an integer).
- `guessers_except(name)`: `SSLPlugin.incompatible` for a label guesser (every other name in `LABEL_GUESSERS`),
  so that two guessers stop at startup naming both and why.

Targets, thresholds, masks (pure functions; nothing here carries a gradient into a target or a mask):

- `class_probs(logits, T=1.0)`: softmax(sg(logits) / T), float32 (P:37-48).
- `confidence_mask(probs, threshold, strict=False)`: 1.0 where max_c probs >= threshold (> when strict), else 0.0;
  `threshold` a float or a per-row tensor [N] (M:55-56, F:116).
- `pseudo_label_loss(logits, targets, mask)`: cross-entropy of `logits` against hard labels [N] (int) or soft
  targets [N, C], times the mask, per row [N] (C:34-38). The official mean over the unlabeled rows (F:118,
  C:40) is the core's reduction, so a term's weight is the official lambda_u unchanged.
- `hard_or_soft_targets(weak_logits, hard, T)`: argmax of the weak view (hard, F:114) or softmax(weak / T) (P:46-48).
- `guessed_probs(outputs)`: the class probabilities of the weak view (`softmax(sg(weak logits))`).

Per-class learning status:

- `learning_effect(selected, num_unlabeled, num_classes, warmup, previous)`: FlexMatch's normalised learning
  effect beta_c (X:24-35) from `selected` [N] (the latest confident class of each dataset row, -1 none).
- `select_confident(selected, idx, probs, threshold)`: `selected` with the rows of `idx` whose max probability is
  >= threshold set to their argmax (X:55-61), no host sync; `class_counts(selected, C)`: sigma_c.
- `ema(old, new, momentum)`: momentum * old + (1 - momentum) * new (FreeMatch's and SoftMatch's running class
  statistics).

Diagnostics (read at log steps, diagnostics only):

- `diagnostics(prefix, probs, mask, hidden, thresholds=None)`: "<prefix>/mask_rate" (mean mask: the utilisation
  ratio, official `util_ratio`), "<prefix>/pseudo_acc_kept_pct" (accuracy in % of the pseudo-labels on the kept
  rows, weighted by the mask, so a soft mask gives a weighted accuracy), "<prefix>/pseudo_acc_all_pct" (on every row),
  both over rows of a known class (`batch.y_u_hidden` >= 0; never used in a loss), and per-class thresholds
  "<prefix>/threshold_min|mean|max" (+ "<prefix>/threshold_c<k>" for C <= 10) when given.

The plugin base `WeakStrongPlugin`: views in `ssl_modify_batch`, the forward, the startup checks of the unlabeled
ratio and the strong view, `outputs.y_u` (the soft targets for other plugins: NS3L's negatives), the metrics, and the checkpointing of
`self.status` (a NamedTuple of tensors). A subclass sets `Config` (a `PseudoLabelConfig` for `masked_term`),
implements `ssl_unlabeled_loss` (usually `return self.masked_term(outputs, batch, ctx, mask)`), and may override
`soft_targets` (default: the weak view's probabilities) and `setup(data, device)` (builds `self.status`).

Deviations: the official FixMatch interleaves the batch over GPUs (F:99-101: utils.interleave is for multi-GPU
batch norm); here one process forwards the whole batch, as USB with use_cat. Under torchrun each process
forwards its own rows (batch norm statistics per process unless train.distributed.sync_bn).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ssltrain import ConfigError, LossTerm, Outputs, Section, SSLPlugin, hookimpl

WEAK = "pseudo_labeling/weak"  # batch.extras key: the weak view of the unlabeled rows
WEAK_LOGITS = "pseudo_labeling/weak_logits"  # outputs.extras_u key: its logits, detached, float32


# --- views and the forward ---------------------------------------------------------------------

def add_strong_view(batch, ctx) -> None:
    """The core's unlabeled view becomes the weak view (batch.extras[WEAK]); batch.x_u a fresh strong view."""
    batch.extras[WEAK] = batch.x_u
    batch.x_u = ctx.augment(batch.raw_u, "strong")


def forward_weak_strong(batch, forward) -> Outputs:
    """One forward over cat(x_l, weak, x_u), split back (x_l alone when x_u has no rows)."""
    n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
    weak = batch.extras[WEAK] if n_u else batch.x_u[:0]
    n_w = weak.shape[0]
    out = forward(torch.cat([batch.x_l, weak, batch.x_u]))
    extras = {k: v for k, v in out.items() if k != "logits"}
    logits = out["logits"]
    return Outputs(logits_l=logits[:n_l], logits_u=logits[n_l + n_w:],
                   extras_l={k: v[:n_l] for k, v in extras.items()},
                   extras_u={**{k: v[n_l + n_w:] for k, v in extras.items()},
                             WEAK_LOGITS: logits[n_l:n_l + n_w].detach().float()})


def check_strong_view(config, data, plugin: str) -> None:
    """ConfigError when `ctx.augment(raw, "strong")` would give the weak view (nothing strong to learn from)."""
    a = config.data.augment
    if data.kind == "vector" and a.strong_noise_std <= a.noise_std:
        raise ConfigError(f"{plugin} trains a strong view against a weak one, but on vector data the strong view is "
                          f"Gaussian noise of data.augment.strong_noise_std={a.strong_noise_std}, not above the weak "
                          f"view's data.augment.noise_std={a.noise_std}; set data.augment.strong_noise_std above it "
                          f"(e.g. 0.3)")
    if data.kind == "image" and a.num_ops == 0 and a.cutout == 0:
        raise ConfigError(f"{plugin} trains a strong view against a weak one, but data.augment.num_ops=0 and "
                          f"data.augment.cutout=0 make the strong view a weak one; set data.augment.num_ops=2 "
                          f"(RandAugment, official) or data.augment.cutout=0.5")


def check_unlabeled_ratio(config, plugin: str) -> None:
    """ConfigError unless data.unlabeled_batch_size is a whole multiple of data.batch_size: the family draws uratio
    unlabeled rows per labeled row, an integer in the official code (F:165-176 `uratio`; USB `--uratio`, int)."""
    labeled, unlabeled = config.data.batch_size, config.data.unlabeled_batch_size
    if unlabeled % labeled:
        ratio = max(1, round(unlabeled / labeled))
        raise ConfigError(f"{plugin} draws a whole number of unlabeled rows per labeled row (the official uratio), but "
                          f"data.unlabeled_batch_size={unlabeled} is not a multiple of data.batch_size={labeled}; set "
                          f"data.unlabeled_batch_size={ratio * labeled} (uratio {ratio}) or another multiple")


# --- targets, thresholds, masks ----------------------------------------------------------------

def class_probs(logits: Tensor, T: float = 1.0) -> Tensor:
    """softmax(sg(logits) / T) in float32: a detached class distribution [N, C]."""
    return (logits.detach().float() / T).softmax(-1)


def guessed_probs(outputs: Outputs) -> Tensor:
    """The weak view's class probabilities [B_u, C] (detached) from `forward_weak_strong`'s outputs."""
    return class_probs(outputs.extras_u[WEAK_LOGITS])


def confidence_mask(probs: Tensor, threshold: float | Tensor, strict: bool = False) -> Tensor:
    """1.0 where max_c probs >= threshold (> when strict), else 0.0; float [N], no gradient.
    `threshold`: a float, or a tensor [N] of per-row thresholds (e.g. the threshold of each row's argmax class)."""
    top = probs.detach().max(-1).values
    return (top > threshold if strict else top >= threshold).float()


def hard_or_soft_targets(weak_logits: Tensor, hard: bool, T: float) -> Tensor:
    """The pseudo-label: argmax of the weak view [N] (hard) or softmax(sg(weak) / T) [N, C] (soft)."""
    return weak_logits.detach().argmax(-1) if hard else class_probs(weak_logits, T)


def pseudo_label_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per row [N]: mask * CE(logits, targets), targets int labels [N] or distributions [N, C] (detached here)."""
    log_p = logits.float().log_softmax(-1)
    if targets.dim() == 1:
        ce = F.nll_loss(log_p, targets, reduction="none")
    else:
        ce = -(targets.detach() * log_p).sum(-1)
    return ce * mask


# --- per-class learning status -----------------------------------------------------------------

def select_confident(selected: Tensor, idx: Tensor, probs: Tensor, threshold: float) -> Tensor:
    """`selected` [N] with each row idx[i] whose max probability is >= threshold set to its argmax class
    (others keep their value). A new tensor; no data-dependent shapes, so no host sync."""
    top, label = probs.max(-1)
    return selected.index_put((idx,), torch.where(top >= threshold, label, selected[idx]))


def class_counts(selected: Tensor, num_classes: int) -> Tensor:
    """sigma_c: how many rows of `selected` hold class c (-1 rows count for none), float [C]."""
    return torch.bincount(selected + 1, minlength=num_classes + 1)[1:].float()


def learning_effect(selected: Tensor, num_unlabeled: int, num_classes: int, warmup: bool,
                    previous: Tensor) -> Tensor:
    """FlexMatch's normalised learning effect beta_c [C] (USB flexmatch/utils.py:24-35).

    sigma_c = unlabeled rows whose latest confident prediction is c; unused = num_unlabeled - sum sigma.
    warmup: beta_c = sigma_c / max(max_c sigma, unused); else beta_c = sigma_c / max_c sigma. As the official
    code, `previous` is kept while the largest count (unused included) is still num_unlabeled (nothing selected yet,
    or every row in one class)."""
    sigma = class_counts(selected, num_classes)
    unused = num_unlabeled - sigma.sum()
    largest = torch.maximum(sigma.max(), unused)
    denominator = largest if warmup else sigma.max()
    return torch.where(largest < num_unlabeled, sigma / denominator.clamp(min=1), previous)


def ema(old: Tensor, new: Tensor, momentum: float) -> Tensor:
    """momentum * old + (1 - momentum) * new."""
    return momentum * old + (1 - momentum) * new


# --- diagnostics -------------------------------------------------------------------------------

def diagnostics(prefix: str, probs: Tensor, mask: Tensor, hidden: Tensor, thresholds: Tensor | None = None) -> dict:
    """Mask rate, pseudo-label accuracy (%) on the kept rows (mask-weighted) and on all rows of a known class,
    and per-class thresholds when given. Tensors (no host sync); `hidden` is for diagnostics only."""
    seen = (hidden >= 0).float()
    correct = (probs.argmax(-1) == hidden).float() * seen
    kept = mask.float() * seen
    out = {f"{prefix}/mask_rate": mask.float().mean(),
           f"{prefix}/pseudo_acc_kept_pct": 100 * (correct * kept).sum() / kept.sum().clamp(min=1e-12),
           f"{prefix}/pseudo_acc_all_pct": 100 * correct.sum() / seen.sum().clamp(min=1)}
    if thresholds is not None:
        out.update({f"{prefix}/threshold_min": thresholds.min(), f"{prefix}/threshold_mean": thresholds.mean(),
                    f"{prefix}/threshold_max": thresholds.max()})
        if thresholds.numel() <= 10:
            out.update({f"{prefix}/threshold_c{c}": t for c, t in enumerate(thresholds)})
    return out


# --- the plugin base ---------------------------------------------------------------------------

#: Plugins that guess labels for the unlabeled rows: two of them train the same rows towards two targets.
LABEL_GUESSERS = ("fixmatch", "flexmatch", "freematch", "softmatch", "uda", "pseudo_label", "mixmatch", "remixmatch")


def guessers_except(name: str) -> dict[str, str]:
    """`SSLPlugin.incompatible` for a label guesser: every other label guesser, with the reason."""
    return {other: "both guess labels for the unlabeled rows and train them towards their own targets "
                   "(two label guessers)" for other in LABEL_GUESSERS if other != name}


#: What the family's TensorBoard tags mean ("<plugin>/" prefixed by `WeakStrongPlugin.descriptions`).
FAMILY_DESCRIPTIONS = {
    "unlabeled": "lambda_u times the mean over the unlabeled rows of mask * cross-entropy of the strong view against "
                 "the weak view's pseudo-label (rows below the threshold count 0).",
    "mask_rate": "Mean mask over the unlabeled rows (share kept, weighted for a soft mask; official util_ratio), "
                 "in [0, 1].",
    "pseudo_acc_kept_pct": "Accuracy of the pseudo-labels on the kept rows (weighted by the mask), in %, by the hidden "
                           "labels (diagnosis only; rows of an unknown class excluded).",
    "pseudo_acc_all_pct": "Accuracy of the pseudo-labels on every unlabeled row, in %, by the hidden labels "
                          "(diagnosis only; rows of an unknown class excluded).",
    "threshold_min": "Smallest per-class confidence threshold, a probability in [0, 1].",
    "threshold_mean": "Mean per-class confidence threshold, a probability in [0, 1].",
    "threshold_max": "Largest per-class confidence threshold, a probability in [0, 1].",
}


class PseudoLabelConfig(Section):
    """Settings every hard/soft pseudo-label plugin of the family shares (subclass it for a plugin's Config)."""

    lambda_u: float = Field(1.0, ge=0, description="Weight of the unlabeled term (official `lambda_u` / `wu`).")
    hard_label: bool = Field(True, description="Argmax pseudo-labels (official); False: softmax(weak / T) soft targets.")
    T: float = Field(0.5, gt=0, description="Temperature of the soft targets (hard_label: false only).")


class WeakStrongPlugin(SSLPlugin):
    """Base of the weak/strong pseudo-labeling plugins (module docstring). Owns `ssl_forward`.

    State: a subclass keeps its running state in `self.status`, a NamedTuple of tensors (None: stateless), built
    in `setup`; the base checkpoints and restores it. `own_descriptions`: a subclass's tags beyond the family's
    (keys without the "<plugin>/" prefix)."""

    own_descriptions: dict[str, str] = {}

    @property
    def descriptions(self) -> dict[str, str]:
        return {f"{self.name}/{k}": v for k, v in {**FAMILY_DESCRIPTIONS, **self.own_descriptions}.items()}

    def __init__(self, config=None):
        super().__init__(config)
        self.diagnostics: dict[str, Tensor] = {}
        self.status: NamedTuple | None = None

    def setup(self, data, device: torch.device) -> None:
        """Build state sized by the data (called once at startup, before any resume). Default: none."""

    def soft_targets(self, outputs: Outputs) -> Tensor:
        """The soft targets exposed as `outputs.y_u` (default: the weak view's class probabilities)."""
        return guessed_probs(outputs)

    def masked_term(self, outputs: Outputs, batch, ctx, mask: Tensor, thresholds: Tensor | None = None,
                    **logged: Tensor) -> LossTerm:
        """"<name>/unlabeled": mask * CE(strong logits, pseudo-label of the weak view) per row, weight lambda_u
        (needs a `PseudoLabelConfig`); at log steps it also records the diagnostics (plus `logged`)."""
        cfg = self.config
        targets = hard_or_soft_targets(outputs.extras_u[WEAK_LOGITS], cfg.hard_label, cfg.T)
        if ctx.is_log_step:
            self.diagnostics = {**diagnostics(self.name, guessed_probs(outputs), mask, batch.y_u_hidden, thresholds),
                                **{f"{self.name}/{k}": v for k, v in logged.items()}}
        return LossTerm(f"{self.name}/unlabeled", pseudo_label_loss(outputs.logits_u, targets, mask), weight=cfg.lambda_u)

    @hookimpl
    def ssl_configure(self, config):
        check_unlabeled_ratio(config, self.name)

    @hookimpl(wrapper=True)
    def ssl_build_model(self, config, data):
        check_strong_view(config, data, self.name)
        self.setup(data, data.y_hidden.device)
        return (yield)

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        add_strong_view(batch, ctx)

    @hookimpl
    def ssl_forward(self, batch, forward):
        outputs = forward_weak_strong(batch, forward)
        if batch.x_u.shape[0]:
            outputs.y_u = self.soft_targets(outputs)
            batch.extras[f"{self.name}/pseudo_labels"] = guessed_probs(outputs)  # TensorBoard's sample grid
        return outputs

    @hookimpl
    def ssl_metrics(self):
        return self.diagnostics

    @hookimpl
    def ssl_state_dict(self, state):
        if self.status is not None:
            state[self.name] = self.status._asdict()

    @hookimpl
    def ssl_load_state_dict(self, state):
        if self.status is not None:
            device = self.status[0].device
            self.status = type(self.status)(**{k: v.to(device) for k, v in state[self.name].items()})
