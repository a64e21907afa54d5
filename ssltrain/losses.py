"""How the core composes the loss of a step from the plugins' terms (the closure in loop.py).

The convention every plugin follows (docs/plugins.md, "Normalisation"): the supervised loss is the
mean over the labeled rows, each weighted unlabeled term the mean over the unlabeled rows (times the
per-row weights of `ssl_unlabeled_weights`), and a term's `weight` is its effective coefficient against
that supervised mean. A plugin whose official code averages differently converts its coefficient once,
in its defaults, and documents the conversion.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .errors import NonFiniteLossError, PluginContractError
from .types import LossTerm


def loss_tag(name: str) -> str:
    """The TensorBoard and train.jsonl name of an accumulated loss: "total", "supervised" or a term's
    "<plugin>/<term>" under "loss/" (every one a weighted contribution: they add up to loss/total)."""
    return f"loss/{name}"


def as_terms(results) -> list[LossTerm]:
    """Flatten `ssl_unlabeled_loss` results (None, a LossTerm, or lists of them) into one list."""
    return [t for r in results if r is not None for t in (r if isinstance(r, (list, tuple)) else [r])]


def reduce_term(term: LossTerm, weights, batch_u: int) -> torch.Tensor:
    """weight * mean(w * per_sample), checking the LossTerm contract (no host sync)."""
    if not isinstance(term, LossTerm) or "/" not in term.name:
        raise PluginContractError(f"ssl_unlabeled_loss must return LossTerm(name='<plugin>/<term>', ...), got {term!r}")
    ps = term.per_sample
    if not ps.is_floating_point():
        raise PluginContractError(f"loss term {term.name!r}: per_sample must be floating point, got {ps.dtype}")
    if term.weighted:
        if ps.dim() == 0 or ps.shape[0] != batch_u:
            raise PluginContractError(
                f"loss term {term.name!r}: per_sample has shape {tuple(ps.shape)} but the unlabeled batch has "
                f"{batch_u} rows; return one loss per unlabeled sample ([B_u] or [B_u, V]) or set weighted=False")
        if weights is not None:
            ps = ps * weights.view(-1, *([1] * (ps.dim() - 1)))
    return term.weight * ps.float().mean()


def read_means(sums: dict[str, torch.Tensor], first_bad: torch.Tensor, count: int, dist, checkpoints: Path) -> dict[str, float]:
    """Mean of each accumulated loss term over `count` steps and the processes: one host sync.
    Raises NonFiniteLossError naming the term and the plugin when `first_bad` (the first step with a
    non-finite total, or -1) is set."""
    names = list(sums)
    stacked = dist.sum_(torch.stack([sums[n].float() / dist.world for n in names] + [first_bad.float()]))
    values = stacked.tolist()
    if values[-1] >= 0:
        bad = [n for n, v in zip(names, values) if n != "total" and not math.isfinite(v)] or ["total"]
        where = ", ".join(f"{n!r}" + (f" (plugin {n.split('/')[0]!r})" if "/" in n else "") for n in bad)
        raise NonFiniteLossError(
            f"loss term {where} became non-finite at step {int(values[-1])}; the run stopped and the last good "
            f"checkpoint in {checkpoints} is intact (lower the learning rate or the term's weight, "
            f"or use train.amp=none)")
    return {loss_tag(n): v / count for n, v in zip(names, values)}
