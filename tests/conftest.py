"""Shared helpers. The fixtures `ssl_config` and `ssl_run` come from ssltrain's own pytest plugin
(`ssltrain.testing`, registered through the `pytest11` entry point), the same ones plugin authors use."""
from __future__ import annotations

from ssltrain.tiny import TINY, tiny_config

make_config = tiny_config

__all__ = ["TINY", "make_config"]
