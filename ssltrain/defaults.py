"""The core's default implementations of the one-owner hooks, registered as `ssltrain.defaults`
with `trylast`, so that a plugin's implementation or wrapper takes precedence."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .hookspecs import hookimpl
from .models import build_backbone
from .types import LossResult, Outputs, StepResult


def split_rows(out: dict, n: int) -> Outputs:
    """Outputs from a model output dict over cat(x_l, x_u): rows [:n] labeled, [n:] unlabeled."""
    extras = {k: v for k, v in out.items() if k != "logits"}
    return Outputs(logits_l=out["logits"][:n], logits_u=out["logits"][n:],
                   extras_l={k: v[:n] for k, v in extras.items()},
                   extras_u={k: v[n:] for k, v in extras.items()})


def logits_of(out) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else out


class CoreDefaults:
    def __init__(self, config):
        self.config = config

    @hookimpl(trylast=True)
    def ssl_build_model(self, config, num_classes, input_shape):
        try:
            return build_backbone(config.model.name, num_classes, tuple(input_shape), **config.model.options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {exc} (check model.name and model.options)") from None

    @hookimpl(trylast=True)
    def ssl_forward(self, batch, forward):
        return split_rows(forward(torch.cat([batch.x_l, batch.x_u])), batch.x_l.shape[0])

    @hookimpl(trylast=True)
    def ssl_supervised_loss(self, outputs, batch):
        return F.cross_entropy(outputs.logits_l.float(), batch.y_l, reduction="none")

    @hookimpl(trylast=True)
    def ssl_unlabeled_weights(self):
        return None

    @hookimpl(trylast=True)
    def ssl_optimizer_step(self, closure, model, optimizer, scaler):
        loss: LossResult = closure()
        scaler.scale(loss.total).backward()
        if self.config.optim.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss)

    @hookimpl(trylast=True)
    def ssl_predict(self, model, x):
        return logits_of(model(x))
