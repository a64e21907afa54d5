"""Shared helpers. The fixtures `ssl_config` and `ssl_run` come from ssltrain's own pytest plugin
(`ssltrain.testing`, registered through the `pytest11` entry point), the same ones plugin authors use."""
from __future__ import annotations

from ssltrain.tiny import TINY, tiny_config


def make_config(*overrides: str, **kwargs):
    """`tiny_config` with the `dotted.key=value` overrides given positionally (the suite's short form)."""
    return tiny_config(overrides=overrides, **kwargs)


__all__ = ["TINY", "make_config"]
