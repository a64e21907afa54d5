"""Plugin discovery and the per-run plugin manager.

Built-in and third-party plugins load the same way: from the `ssltrain.plugins` entry-point
group (`[project.entry-points."ssltrain.plugins"] name = "package.module:PluginClass"`).
Only plugins listed in the YAML `plugins:` list are active, and hooks run in that order.
"""
from __future__ import annotations

import difflib
import inspect
import os
import sys
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .errors import ConfigError, PluginConflictError, PluginError

ENTRY_POINT_GROUP = "ssltrain.plugins"
DEFAULTS_NAME = "ssltrain.defaults"
TRACE_ENV = "SSLTRAIN_TRACE_HOOKS"


class SSLPlugin:
    """Optional base class for plugins: any class with `ssltrain.hookimpl` methods works the same.

    The core builds one instance per run, `cls(config)`, where `config` is the plugin's validated
    section (an instance of its nested `Config`, a `ssltrain.Section`) or None when `Config` is None;
    a subclass that needs its own `__init__(self, config=None)` calls `super().__init__(config)`.
    Keep per-run state on the instance (built lazily on `ctx.device` when it needs the device) and
    save what later steps depend on with `ssl_state_dict`. `self.name` is the name the plugin is
    registered under (its `plugins:` entry): "" inside `__init__`, set before the first hook.
    A plugin that implements `ssl_unlabeled_loss` makes the run draw unlabeled batches, unless its
    `uses_unlabeled` is False (e.g. an optional unlabeled term switched off in its config).
    `incompatible` maps the names of plugins it cannot run with to the reason; listing both stops
    the run at startup.

    What users see (README, "What you see"): `descriptions` maps the plugin's TensorBoard names (its
    diagnostics "<plugin>/<name>", loss terms "<plugin>/<term>", evaluation scalars) to a sentence that
    says what the value is and its unit, shown on the TensorBoard card; `describe()` is the plugin's line
    in the startup header.
    """

    Config = None
    name: str = ""
    incompatible: dict[str, str] = {}
    descriptions: dict[str, str] = {}

    def __init__(self, config=None):
        self.config = config

    def describe(self) -> str:
        """One line for the startup header: the loss terms the plugin adds and their effective weights.
        Default: the plugin's settings, "key value, ..."."""
        return settings_text(self.config)


def settings_text(config) -> str:
    """"key value, ..." of a config section ("no settings" for None)."""
    if config is None:
        return "no settings"
    return ", ".join(f"{k} {v}" for k, v in config.model_dump().items())


def descriptions(pm: pluggy.PluginManager) -> dict[str, str]:
    """The `descriptions` of every registered plugin, merged (TensorBoard tag name -> sentence)."""
    out: dict[str, str] = {}
    for plugin in pm.get_plugins():
        out.update(getattr(plugin, "descriptions", None) or {})
    return out


def discover() -> dict[str, type]:
    """Import every installed plugin class, keyed by entry-point name."""
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception as exc:  # a broken third-party package must say which one it is
            dist = getattr(ep.dist, "name", "?")
            raise PluginError(f"error importing plugin {ep.name!r} ({ep.value}, from {dist}): "
                              f"{type(exc).__name__}: {exc}") from exc
    return found


def schemas(classes: dict[str, type]) -> dict:
    """Plugin name -> its Config class (or None)."""
    return {name: getattr(cls, "Config", None) for name, cls in classes.items()}


def hooks_of(obj) -> list[str]:
    """Names of the hooks a plugin class or instance implements."""
    return sorted(n for n in dir(obj) if n.startswith("ssl_")
                  and hasattr(getattr(obj, n, None), f"{hookspecs.PROJECT}_impl"))


def build_manager(config, classes: dict[str, type], defaults) -> pluggy.PluginManager:
    """A fresh plugin manager for one run: core defaults plus the active plugins, checked."""
    _check_compatible(config.plugins, classes)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name=DEFAULTS_NAME)
    for name in reversed(config.plugins):  # pluggy calls last-registered first: YAML order
        plugin = classes[name](config.plugin_configs.get(name))
        plugin.name = name
        _check_arguments(name, plugin)
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} implements a hook wrongly: {exc}") from None
    _check_pending(pm)
    _check_one_owner(pm)
    if os.environ.get(TRACE_ENV):
        _trace(pm)
    return pm


def _check_compatible(plugins: list[str], classes: dict[str, type]) -> None:
    for name in plugins:
        for other, reason in getattr(classes[name], "incompatible", {}).items():
            if other in plugins:
                raise ConfigError(f"plugins {name!r} and {other!r} cannot run together: {reason}; "
                                  f"remove one of them from `plugins:`")


def _check_arguments(name: str, plugin) -> None:
    for hook in hooks_of(plugin):
        spec = getattr(hookspecs, hook, None)
        if spec is None:
            continue  # an unknown hook name: reported by _check_pending with a suggestion
        allowed = list(inspect.signature(spec).parameters)
        extra = [a for a in inspect.signature(getattr(plugin, hook)).parameters if a not in allowed]
        if extra:
            raise PluginError(f"plugin {name!r}: {hook} takes unknown argument(s) {extra}; the hook's arguments "
                              f"are ({', '.join(allowed)}) and an implementation may take any subset of them")


def _check_pending(pm: pluggy.PluginManager) -> None:
    specs = [n for n in dir(hookspecs) if n.startswith("ssl_")]
    for name in dir(pm.hook):
        caller = getattr(pm.hook, name)
        if isinstance(caller, pluggy.HookCaller) and not caller.has_spec():
            plugins = [i.plugin_name for i in caller.get_hookimpls()]
            close = difflib.get_close_matches(name, specs, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PluginError(f"plugin {plugins[0]!r} implements unknown hook {name!r}{hint}; "
                              f"known hooks: {specs}")


def _check_one_owner(pm: pluggy.PluginManager) -> None:
    for name in hookspecs.ONE_OWNER:
        owners = [i.plugin_name for i in getattr(pm.hook, name).get_hookimpls()
                  if not (i.wrapper or i.hookwrapper) and i.plugin_name != DEFAULTS_NAME]
        if len(owners) > 1:
            owners = sorted(owners)
            raise PluginConflictError(
                f"hook {name!r} can have one owner, but enabled plugins {owners[0]!r} and {owners[1]!r} "
                f"both implement it; remove one of them from `plugins:` "
                f"(a plugin that only adjusts the result should use @hookimpl(wrapper=True))")


def _trace(pm: pluggy.PluginManager) -> None:
    def before(hook_name, impls, kwargs):
        names = ", ".join(i.plugin_name for i in reversed(impls))
        print(f"[ssltrain hook] {hook_name} -> {names}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, lambda *args: None)
