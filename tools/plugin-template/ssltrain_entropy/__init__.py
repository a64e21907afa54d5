"""Entropy minimisation (Grandvalet & Bengio 2005): push unlabeled predictions to be confident."""
from __future__ import annotations

import torch
from pydantic import Field

from ssltrain import LossTerm, Section, SSLPlugin, hookimpl


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax(logits), in nats, shape [N]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class EntropyMin(SSLPlugin):
    """Adds "entropy/ent": weight * mean entropy of the unlabeled predictions."""

    class Config(Section):
        weight: float = Field(0.1, ge=0)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs):
        return LossTerm("entropy/ent", entropy(outputs.logits_u), weight=self.config.weight)

    @hookimpl
    def ssl_metrics(self, result):
        return {"entropy/mean_confidence": result.loss.outputs.logits_u.softmax(-1).amax(-1).mean()}
