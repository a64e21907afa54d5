"""Evaluation metrics: top-1, per-class accuracy, expected calibration error, confusion matrix."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]], num_classes: int,
             device: torch.device, ece_bins: int = 15, sum_: Callable[[Tensor], Tensor] = lambda t: t) -> dict:
    """Metrics of `predict` (inputs -> class scores) on the (x, y) `batches` (on `device`); one host sync
    at the end.

    sum_: sums the accumulated counts over processes when each evaluates a shard of the test set.

    Returns top1 (in %), nll, ece (in %, equal-width confidence bins), per_class_top1 (list, %),
    confusion (list of rows: true class -> counts of predicted classes).
    """
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    bins = torch.zeros(3, ece_bins, device=device, dtype=torch.float64)  # count, conf sum, correct sum
    nll = torch.zeros((), device=device, dtype=torch.float64)
    for x, target in batches:
        scores = predict(x).float()
        logp = scores.log_softmax(-1)
        conf, pred = logp.exp().max(-1)
        nll += -logp.gather(1, target[:, None]).sum().double()
        confusion += torch.bincount(target * num_classes + pred, minlength=num_classes ** 2)
        b = (conf * ece_bins).long().clamp_(max=ece_bins - 1)
        for row, values in enumerate((torch.ones_like(conf), conf, (pred == target).float())):
            bins[row].index_add_(0, b, values.double())
    totals = sum_(torch.cat([confusion.double(), bins.flatten(), nll[None]]))
    confusion = totals[:num_classes ** 2].long().view(num_classes, num_classes)
    bins, nll = totals[num_classes ** 2:-1].view(3, ece_bins), totals[-1]
    n = confusion.sum().clamp(min=1)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    ece = (bins[1] - bins[2]).abs().sum() / n
    top1 = confusion.diag().sum() / n
    values = torch.stack([top1.double(), nll / n, ece.double()]).tolist()
    return {"top1": 100 * values[0], "nll": values[1], "ece": 100 * values[2],
            "per_class_top1": [100 * v for v in per_class.tolist()], "confusion": confusion.tolist()}
