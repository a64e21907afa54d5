"""User-facing errors. The CLI prints their message (no traceback) and exits non-zero."""


class SSLTrainError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(SSLTrainError):
    """Bad YAML, unknown key, wrong type, out-of-range value, or incompatible settings."""


class PluginError(SSLTrainError):
    """A plugin is unknown, fails to load, or implements a hook wrongly (bad name or argument)."""


class PluginConflictError(PluginError):
    """Two enabled plugins claim the same one-owner hook."""


class PluginContractError(PluginError):
    """A hook returned something that breaks its contract (shape, dtype, name)."""


class NonFiniteLossError(SSLTrainError):
    """A loss term became NaN or infinite; the last good checkpoint is left intact."""


class Interrupted(SSLTrainError):
    """SIGINT/SIGTERM arrived; a checkpoint was written first (exit code 130)."""


class CheckpointError(SSLTrainError):
    """A checkpoint is missing, unreadable, or does not match the run."""


class DataError(SSLTrainError):
    """An input file is unreadable or corrupt (with `data.on_bad_file: error`), or too many are in a row."""
