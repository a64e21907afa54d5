"""The command line, run in-process: user errors exit non-zero with a message, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import TINY
from ssltrain.cli import main


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "plugins": ["pi_model"]}))
    return path


def test_train_eval_and_resume(cfg, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.steps=10", "--set", "seed=3"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy (ema model)" in printed and f"tensorboard --logdir {out / 'tb'}" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.steps=20", "--set", "seed=3", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 20
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 20 and metrics["top1"] == json.loads((out / "summary.json").read_text())["test_top1"]
    assert main(["eval", str(out / "checkpoints" / "best.pt")]) == 0


def test_config_prints_resolved_config(cfg, capsys):
    assert main(["config", str(cfg), "--set", "plugins=[]", "--set", "data.num_labeled=250"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["plugins"] == [] and resolved["data"]["num_labeled"] == 250
    assert "pi_model" not in resolved and resolved["train"]["checkpoint_every"] == 10
    assert main(["config", str(cfg)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["pi_model"]["weight"] == 20.0  # active: defaults shown


@pytest.mark.parametrize("args, message", [
    (["config", "{cfg}", "--set", "train.stpes=3"], "did you mean 'steps'"),
    (["config", "missing.yaml"], "not found"),
    (["train", "{cfg}", "--set", "data.name=fashion_mnist", "--set", "data.root=/nonexistent",
      "--set", "data.options={{}}", "--out", "{tmp}/x"], "apt-get install dataset-fashion-mnist"),
    (["eval", "{tmp}/nothing"], "checkpoint.*not found"),
    (["train", "{cfg}", "--out", "{tmp}/fresh", "--resume"], "not found"),
])
def test_user_errors_exit_nonzero_with_a_message(cfg, tmp_path, capsys, args, message):
    import re
    args = [a.format(cfg=cfg, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssltrain: error:") and "Traceback" not in err
    assert re.search(message, err), err


def test_plugins_lists_every_builtin_with_hooks(capsys):
    from ssltrain.plugins import discover
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in lines}
    assert set(discover()) <= names
    pi = next(line for line in lines if line.startswith("pi_model "))
    assert "ssl_unlabeled_loss" in pi and "weight=20.0" in pi and "ssltrain" in pi


def test_hooks_command_lists_every_hook(capsys):
    from ssltrain import hookspecs
    assert main(["hooks"]) == 0
    out = capsys.readouterr().out
    for name in (n for n in dir(hookspecs) if n.startswith("ssl_")):
        assert name in out


def test_closed_stdout_exits_quietly():
    """`ssltrain plugins | head`: when the reader has gone, exit 141 with no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the child's stdout now fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "ssltrain.cli", "plugins"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr
