"""The public face: plugins import `ssltrain` and nothing below it; every exported name exists."""
from __future__ import annotations

import ast
from pathlib import Path

import ssltrain

ROOT = Path(__file__).resolve().parents[1]


def private_imports(path: Path) -> list[str]:
    """`ssltrain.<module>` imports in a source file (any `import` or `from ... import` form)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssltrain."):
            found.append(f"{path.name}:{node.lineno} from {node.module}")
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("ssltrain.")]
    return found


def test_plugins_import_only_the_public_face():
    sources = sorted((ROOT / "plugins").glob("*.py")) + sorted((ROOT / "tools" / "plugin-template").rglob("*.py"))
    assert sources
    offenders = [hit for path in sources for hit in private_imports(path)]
    assert offenders == [], f"plugins must import from `ssltrain` only: {offenders}"


def test_the_check_catches_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom ssltrain.optim import linear_rampup\nimport ssltrain.loop as loop\n")
    assert private_imports(bad) == ["bad.py:2 from ssltrain.optim", "bad.py:3 import ssltrain.loop"]


def test_every_exported_name_exists():
    missing = [name for name in ssltrain.__all__ if not hasattr(ssltrain, name)]
    assert missing == []
    for name in ("hookimpl", "SSLPlugin", "Section", "SSLBatch", "Outputs", "LossTerm", "StepContext", "SSLData",
                 "ConfigError", "linear_rampup", "sigmoid_rampup", "all_reduce_mean", "logits_of", "register_schedule"):
        assert name in ssltrain.__all__
