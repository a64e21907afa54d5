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
    """One training step's rows on the training device: drawn by the core, changed only in `ssl_modify_batch`.

    Labeled rows (this process's share of `data.batch_size`, always drawn):
    x_l: the labeled view (`data.augment.labeled_view`, "weak" by default), normalised for the model.
    y_l: int labels [B_l] in 0..C-1, or soft targets [B_l, C] once a mixing plugin replaced them.
    raw_l: the same rows before augmentation: images float in [0, 1], not normalised; vectors as stored.
    idx_l: their dataset indices (rows of `SSLData.train_x`); with few labels a sample repeats in a batch.
    Unlabeled rows (this process's share of `data.unlabeled_batch_size`; zero rows when no active plugin
    implements `ssl_unlabeled_loss` with `uses_unlabeled` true, e.g. the supervised `plugins: []`):
    x_u, raw_u, idx_u: as for the labeled rows (`data.augment.unlabeled_view`). Draw further views with
        `ctx.augment(batch.raw_u, "strong")`.
    y_u_hidden: the true labels of the unlabeled rows, -1 for a class outside the label space (class
        mismatch) or no label (e.g. STL-10's unlabeled split). For logged diagnostics only (pseudo-label
        accuracy and the like): never in a loss, a weight or a decision of the method.
    y_u: soft targets [B_u, C] set by a label-guessing plugin (e.g. MixMatch); None when none did.
    extras: plugin values for this step, keyed "<plugin>/<name>" (empty when drawn).
    A plugin that changes a side's rows keeps that side's fields row-aligned (K views of x_u: repeat
    y_u_hidden and idx_u K times); weighted unlabeled loss terms have one loss per row of x_u. Every
    closure call of the step sees the same (modified) batch.
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
    """Model outputs of one step's forward, split into labeled and unlabeled rows (what `ssl_forward` returns).

    logits_l: [B_l', C], row-aligned with `batch.x_l`; logits_u: [B_u, C], row-aligned with `batch.x_u`.
    extras_l / extras_u: every other per-row output of the model (a model may return a dict with
    "logits" plus e.g. "z", "log_px"), split the same way, plus the forward owner's own
    "<plugin>/<name>" entries (e.g. the logits of a strong view).
    """

    logits_l: Tensor
    logits_u: Tensor
    extras_l: dict[str, Tensor] = field(default_factory=dict)
    extras_u: dict[str, Tensor] = field(default_factory=dict)


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
    """Read-only facts about the current step, the same object for every hook of the step.

    step: the step being trained, counting from 0 (TensorBoard, metrics.jsonl and checkpoints count
        finished steps: this step is logged as step + 1); total_steps: `train.steps`.
    is_log_step: True when `ssl_metrics` runs after this step (every `train.log_every` steps and the
        last); compute costly diagnostics only then.
    num_classes, device, amp_dtype: of the run (amp_dtype None without mixed precision).
    predict(x, update_bn=True): class scores of the current model through `ssl_predict`, in training
        mode (dropout on, batch-norm batch statistics), for label guessing under `torch.no_grad()`;
        update_bn=False leaves the batch-norm running statistics untouched.
    augment(raw, view): a freshly augmented, normalised view ("weak", "strong" or "none") of raw rows
        such as `batch.raw_u`, drawn from torch's generator (checkpointed, so resumes stay exact).
    progress(length): step / length clipped to [0, 1], for ramps.
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
