"""The README's quickstart: its SSL method clearly beats the supervised baseline on the same labels.

(The full claim, median over seeds 0, 1 and 2, is measured with tools/quickstart_check.py.)
"""
from __future__ import annotations

from pathlib import Path

from ssltrain.cli import load_config
from ssltrain.loop import train
from ssltrain.plugins import discover

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"


def test_quickstart_ssl_beats_supervised_baseline(tmp_path):
    classes = discover()
    ssl = train(load_config(str(QUICKSTART), ["seed=2"], classes), tmp_path / "ssl", classes=classes)
    sup = train(load_config(str(QUICKSTART), ["seed=2", "plugins=[]"], classes), tmp_path / "sup", classes=classes)
    assert ssl["test_top1"] >= 90.0
    assert ssl["test_top1"] >= sup["test_top1"] + 5.0, (ssl["test_top1"], sup["test_top1"])
