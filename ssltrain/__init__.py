"""ssltrain: a plugin-based semi-supervised learning trainer.

Public API for plugin authors: `hookimpl`, `SSLPlugin`, the data types and the errors.
"""
from .config import Section
from .errors import (CheckpointError, ConfigError, Interrupted, NonFiniteLossError, PluginConflictError,
                     PluginContractError, PluginError, SSLTrainError)
from .hookspecs import hookimpl
from .plugins import SSLPlugin
from .types import LossResult, LossTerm, Outputs, SSLBatch, StepContext, StepResult

__all__ = ["hookimpl", "SSLPlugin", "Section", "SSLBatch", "Outputs", "LossTerm", "LossResult",
           "StepResult", "StepContext", "ConfigError", "PluginError", "PluginConflictError",
           "PluginContractError", "NonFiniteLossError", "CheckpointError", "Interrupted", "SSLTrainError"]
