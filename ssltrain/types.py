"""Data passed between the training loop and plugins.

`SSLBatch` is the one mutable object of a step: plugins change it only in
`ssl_modify_batch`. Everything else is created by the core and read by plugins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class SSLBatch:
    """One training step's data, on the training device.

    x_l: augmented labeled inputs [B_l, ...]; y_l: int labels [B_l] or soft targets [B_l, C].
        A plugin that changes x_l's rows keeps y_l and idx_l row-aligned with it.
    x_u: augmented unlabeled rows [B_u, ...] (B_u may be 0: supervised runs draw none). A plugin
        may replace them (e.g. K mixed views -> K * B_u rows); y_u, y_u_hidden and idx_u then stay
        row-aligned with x_u. Weighted unlabeled loss terms have one loss per row of x_u.
    y_u: soft targets [B_u, C] for the unlabeled rows, set by a label-guessing plugin (e.g.
        MixMatch's sharpened, mixed guesses); None when no plugin guesses labels before the forward
        (a guesser that guesses from the forward itself sets `Outputs.y_u` instead).
    raw_l, raw_u: the drawn samples before augmentation (images in [0, 1], not normalised);
        plugins draw further views with `ctx.augment(raw_u, "weak")`.
    y_u_hidden: true labels of the unlabeled rows (-1 for classes outside the label space).
        For logged diagnostics only: never use them in a loss.
    idx_u: dataset indices of the unlabeled rows; idx_l: of the labeled rows.
    extras: plugin-owned values, keyed "<plugin>/<name>".
    """

    x_l: Tensor
    y_l: Tensor
    x_u: Tensor
    raw_l: Tensor
    raw_u: Tensor
    y_u_hidden: Tensor
    idx_u: Tensor
    idx_l: Tensor
    y_u: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outputs:
    """Model outputs of one forward over the batch, split into labeled and unlabeled rows.

    `extras_l`/`extras_u` hold any other per-row tensors the model returns
    (a model may return a dict with "logits" plus e.g. "z", "logdet").
    `y_u`: soft targets [B_u, C] for the rows of x_u guessed from this forward's own predictions
    (detached class distributions), set by a label guesser that owns the forward (e.g. FixMatch: the
    weak view's class probabilities, whose argmax is its hard pseudo-label); None otherwise. A plugin
    that uses a guesser's targets reads `batch.y_u` (guessed before the forward) or else `outputs.y_u`.
    """

    logits_l: Tensor
    logits_u: Tensor
    extras_l: dict[str, Tensor] = field(default_factory=dict)
    extras_u: dict[str, Tensor] = field(default_factory=dict)
    y_u: Tensor | None = None


@dataclass
class LossTerm:
    """One named unlabeled loss term.

    name: "<plugin>/<term>", used in logs and error messages.
    per_sample: losses, one per unlabeled row of `batch.x_u` [B_u], or [B_u, V] for V views per row.
    weight: scalar multiplier (float or 0-dim tensor), e.g. lambda times a ramp.
    weighted: whether the per-sample unlabeled weights (`ssl_unlabeled_weights`) apply. Set it to
        False for rows that are not unlabeled samples (per_sample may then have any shape).
    The core reduces a term to `weight * mean(w * per_sample)`.
    """

    name: str
    per_sample: Tensor
    weight: float | Tensor = 1.0
    weighted: bool = True


@dataclass
class LossResult:
    """What the closure returns: the total loss and its parts (all tensors, nothing synced)."""

    total: Tensor
    supervised: Tensor  # per-sample supervised loss [B_l']
    terms: list[LossTerm]
    reduced: dict[str, Tensor]  # term name -> its weighted contribution to `total`
    weights: Tensor | None
    outputs: Outputs


@dataclass
class StepResult:
    """What `ssl_optimizer_step` returns: the loss of the real update and plugin extras."""

    loss: LossResult
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepContext:
    """Read-only facts about the current step.

    predict(x, update_bn=True): class scores from the current model via `ssl_predict` (call under
        no_grad for guesses; update_bn=False leaves batch-norm running statistics untouched).
    augment(raw, view): a freshly augmented, normalised view ("weak", "strong", "none") of raw inputs.
    """

    step: int
    total_steps: int
    num_classes: int
    device: torch.device
    amp_dtype: torch.dtype | None
    predict: Callable[..., Tensor]
    augment: Callable[[Tensor, str], Tensor]
    is_log_step: bool = False

    def progress(self, length: int) -> float:
        """Fraction of `length` steps done, clipped to [0, 1] (0 -> 1.0)."""
        return 1.0 if length <= 0 else min(self.step / length, 1.0)
