"""Weak-strong consistency with confident pseudo-labels (the FixMatch recipe, Sohn et al. 2020): a
template for a plugin that owns the forward pass.

One forward runs the labeled rows, the weak view of the unlabeled rows (`batch.x_u`) and a strong
view of the same rows, so batch norm normalises them as one batch (google-research/fixmatch
fixmatch.py:99-104). A row's pseudo-label is the argmax of its weak prediction, without gradient;
rows whose confidence reaches `threshold` add the cross-entropy of their strong prediction against
it, averaged over all unlabeled rows (fixmatch.py:113-118), times `weight` (fixmatch.py:130-131).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ssltrain import (LossTerm, Outputs, PluginContractError, Section, SSLPlugin, all_reduce_mean, hookimpl,
                      split_rows)


DESCRIPTIONS = {
    "consistency": "weight * mean over the unlabeled rows of the strong view's cross-entropy against the weak "
                   "view's pseudo-label, 0 on rows below the threshold.",
    "mask_rate": "Fraction of the unlabeled rows whose pseudo-label passes the threshold, in [0, 1].",
    "pseudo_label_acc_pct": "Share of the kept pseudo-labels that equal the hidden true label, in % (rows of an "
                            "unknown class excluded).",
    "kept_class_balance": "C times the smallest class share of all pseudo-labels kept so far: 1 balanced, 0 a "
                          "class never kept.",
}


def pseudo_labels(logits_weak: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels [B] (argmax of the weak prediction, no gradient) and the float mask [B] of
    the rows whose largest probability is at least `threshold`."""
    confidence, labels = logits_weak.detach().float().softmax(-1).max(-1)
    return labels, (confidence >= threshold).float()


def masked_cross_entropy(logits_strong: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy [B] of the strong predictions against the pseudo-labels, 0 on masked-out rows."""
    return F.cross_entropy(logits_strong.float(), labels, reduction="none") * mask


def split_views(out: dict[str, Tensor], n_l: int, n_u: int, prefix: str) -> Outputs:
    """Outputs of one forward over cat(x_l, x_u, strong view of x_u): every model output split into the
    labeled rows, the unlabeled (weak) rows, and the strong rows as extras_u["<prefix>/<key>_strong"]."""
    outputs = split_rows({k: v[:n_l + n_u] for k, v in out.items()}, n_l)
    outputs.extras_u.update({f"{prefix}/{k}_strong": v[n_l + n_u:] for k, v in out.items()})
    return outputs


class WeakStrong(SSLPlugin):
    """Adds "<name>/consistency": masked cross-entropy of strong views against weak-view pseudo-labels."""

    class Config(Section):
        threshold: float = Field(0.95, gt=0, le=1, description="Confidence a pseudo-label needs (fixmatch.py:116)")
        weight: float = Field(1.0, ge=0, description="Coefficient of the consistency term (FixMatch's wu)")

    @property
    def descriptions(self) -> dict[str, str]:
        """What each TensorBoard tag is, in what unit (shown on its card)."""
        return {f"{self.name}/{tag}": text for tag, text in DESCRIPTIONS.items()}

    def __init__(self, config=None):
        super().__init__(config)
        self.kept_per_class: Tensor | None = None  # pseudo-labels kept so far, per class (checkpointed)
        self.counts: Tensor | None = None  # this log step's kept, correct, kept with a known class, rows

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        batch.extras[f"{self.name}/strong"] = ctx.augment(batch.raw_u, "strong")

    @hookimpl
    def ssl_forward(self, batch, forward):
        n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
        if n_u == 0:
            return None  # no unlabeled rows (e.g. a labeled-only closure): the core's forward
        strong = batch.extras[f"{self.name}/strong"]
        if strong.shape[0] != n_u:
            raise PluginContractError(f"{self.name}: {n_u} unlabeled rows but {strong.shape[0]} strong views; "
                                      f"a plugin listed after it changed batch.x_u")
        return split_views(forward(torch.cat([batch.x_l, batch.x_u, strong])), n_l, n_u, self.name)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs):
        labels, mask = pseudo_labels(outputs.logits_u, self.config.threshold)
        loss = masked_cross_entropy(outputs.extras_u[f"{self.name}/logits_strong"], labels, mask)
        return LossTerm(f"{self.name}/consistency", loss, weight=self.config.weight)

    @hookimpl
    def ssl_step_end(self, result, batch, ctx):
        labels, mask = pseudo_labels(result.loss.outputs.logits_u, self.config.threshold)
        kept = torch.zeros(ctx.num_classes, device=mask.device).index_add_(0, labels, mask)
        if self.kept_per_class is None:
            self.kept_per_class = torch.zeros_like(kept)
        # every process makes this call every step, so the collective is safe and the state identical everywhere
        self.kept_per_class = self.kept_per_class.to(kept.device) + all_reduce_mean(kept)
        if ctx.is_log_step:  # diagnostics: the true labels y_u_hidden (-1: unknown class) never reach a loss
            known = batch.y_u_hidden >= 0
            correct = (labels == batch.y_u_hidden) & known
            self.counts = torch.stack([mask.sum(), (mask * correct).sum(), (mask * known).sum(),
                                       torch.tensor(float(mask.numel()), device=mask.device)])

    @hookimpl
    def ssl_metrics(self):
        kept, correct, kept_known, rows = all_reduce_mean(self.counts).unbind()  # every process, same steps
        share = self.kept_per_class / self.kept_per_class.sum().clamp(min=1)
        return {f"{self.name}/mask_rate": kept / rows.clamp(min=1),
                f"{self.name}/pseudo_label_acc_pct": 100 * correct / kept_known.clamp(min=1),
                f"{self.name}/kept_class_balance": share.min() * share.numel()}  # 1: balanced, 0: a class never kept

    @hookimpl
    def ssl_state_dict(self, state):
        if self.kept_per_class is not None:
            state[self.name] = {"kept_per_class": self.kept_per_class}

    @hookimpl
    def ssl_load_state_dict(self, state):
        if self.name in state:
            self.kept_per_class = state[self.name]["kept_per_class"]
