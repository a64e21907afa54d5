"""ssltrain: a plugin-based semi-supervised learning trainer.

This module is the public face for plugin authors: plugins (the built-in ones too) import from
`ssltrain` and nothing else (`tests/test_public_api.py` enforces it for `plugins/`). Test helpers
live in `ssltrain.testing` (a pytest plugin).

- hooks: `hookimpl`, `SSLPlugin` (base class), `Section` (config sections)
- data types: `SSLBatch`, `Outputs`, `LossTerm`, `LossResult`, `StepResult`, `StepContext`, `SSLData`
- errors: `SSLTrainError` and its subclasses (`ConfigError`, `PluginError`, ...)
- helpers: ramps (`linear_rampup`, `sigmoid_rampup`), `all_reduce_mean`, `logits_of`, `split_rows`,
  `frozen_bn`, `EMA`, and `register_schedule` for learning-rate schedules
- figures for `logger.figure(tag, fig, step)` in the core's style: `per_class_figure`, `confusion_figure`
"""
from .config import Section
from .data import SSLData
from .defaults import logits_of, split_rows
from .distributed import all_reduce_mean
from .errors import (CheckpointError, ConfigError, DataError, Interrupted, NonFiniteLossError, PluginConflictError,
                     PluginContractError, PluginError, SSLTrainError)
from .figures import confusion_figure, per_class_figure
from .hookspecs import hookimpl
from .optim import EMA, frozen_bn, linear_rampup, register_schedule, sigmoid_rampup
from .plugins import SSLPlugin
from .types import LossResult, LossTerm, Outputs, SSLBatch, StepContext, StepResult

__version__ = "0.2.0"

__all__ = ["hookimpl", "SSLPlugin", "Section", "SSLBatch", "Outputs", "LossTerm", "LossResult", "StepResult",
           "StepContext", "SSLData", "ConfigError", "PluginError", "PluginConflictError", "PluginContractError",
           "NonFiniteLossError", "CheckpointError", "DataError", "Interrupted", "SSLTrainError", "linear_rampup",
           "sigmoid_rampup", "all_reduce_mean", "logits_of", "split_rows", "frozen_bn", "EMA",
           "register_schedule", "per_class_figure", "confusion_figure", "__version__"]
