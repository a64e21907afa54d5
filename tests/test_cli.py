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
    header = printed[:printed.index("step ")]  # the startup header comes before the first progress line
    for part in ["device   cpu", "two_moons: 2 classes", "8 labeled", "mlp: ", "parameters",
                 "pi_model: pi_model/consistency x 20", f"tensorboard --logdir {out}"]:
        assert part in header, part
    assert "test accuracy (ema model)" in printed and f"TensorBoard: tensorboard --logdir {out}" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.steps=20", "--set", "seed=3", "--resume"]) == 0
    assert "resuming from step 10 of 20" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["seed"] == 3
    assert summary["command"].startswith("ssltrain train ") and summary["command"].endswith("--resume")
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.steps=20", "--set", "seed=3", "--resume"]) == 0
    assert "already finished: step 20 of 20; nothing to train" in capsys.readouterr().out
    assert main(["eval", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"top-1 accuracy  {summary['test_top1']:6.2f}%" in table and "upper_moon" in table
    assert main(["eval", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 20 and metrics["top1"] == summary["test_top1"]
    assert main(["eval", str(out / "checkpoints" / "best.pt"), "--json"]) == 0
    console = (out / "console.log").read_text()
    assert "resuming from step 10 of 20" in console and "test accuracy (ema model)" in console


def test_default_run_directory_and_latest_link(cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(cfg), "--set", "train.steps=2"]) == 0
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name != "latest"]
    assert len(runs) == 1 and runs[0].name.startswith("tiny-")
    assert (tmp_path / "runs" / "latest").resolve() == runs[0].resolve()
    assert f"run dir  runs/{runs[0].name}" in capsys.readouterr().out


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
    (["train", "{cfg}", "--out", "{tmp}/fresh", "--resume"], "nothing to resume.*not found"),
    (["train", "{cfg}", "--resume"], "--resume needs --out"),
    (["train", "{cfg}", "--out", "{tmp}/a_file"], "is a file, not a directory"),
    (["config", "{cfg}", "--set", "plugins=mixmatch"], r"expected a list.*--set 'plugins=\[mixmatch\]'"),
    (["config", "{cfg}", "--set", "plugins=[pi_model"], "quote the whole --set argument"),
    (["config", "{tmp}/tabs.yaml"], r"tabs.yaml is not valid YAML, line 2, column 1: .*replace the tab characters"),
    (["plugins", "mixmach"], "did you mean 'mixmatch'"),
    # the checks `train` makes before loading data, made by `config` too
    (["config", "{cfg}", "--set", "data.name=fashion_mnst"], "unknown dataset 'fashion_mnst' \\(did you mean"),
    (["config", "{cfg}", "--set", "data.options={{noise: 0.1, bogus: 1}}"], "unknown option.*bogus"),
    (["config", "{cfg}", "--set", "model.name=resnet"], "unknown backbone 'resnet'"),
    (["config", "{cfg}", "--set", "plugins=[mixmatch, sla]"], "cannot run together"),
    (["config", "{cfg}", "--set", "plugins=[flowgmm, mixmatch]", "--set", "data.batch_size=3"], "multiple of"),
    (["config", "{cfg}", "--set", "plugins=[ds3l]"], "list an SSL plugin before it"),
])
def test_user_errors_exit_nonzero_with_a_message(cfg, tmp_path, capsys, args, message):
    import re
    (tmp_path / "a_file").write_text("")
    (tmp_path / "tabs.yaml").write_text("seed: 0\n\tplugins: []\n")
    args = [a.format(cfg=cfg, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssltrain: error:") and "Traceback" not in err
    assert re.search(message, err), err


def test_refused_resume_names_the_keys_and_values(cfg, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.steps=2"]) == 0
    assert main(["train", str(cfg), "--out", str(out), "--set", "train.steps=4", "--set", "data.num_labeled=10",
                 "--set", "pi_model.weight=3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "data.num_labeled: 8 in the checkpoint, 10 now" in err
    assert "pi_model.weight: 20.0 in the checkpoint, 3.0 now" in err


def test_config_notes_settings_that_are_probably_not_meant(cfg, capsys):
    assert main(["config", str(cfg), "--set", "plugins=[]", "--set", "pi_model.weight=3",
                 "--set", "train.eval_every=500"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["plugins"] == []  # stdout stays the resolved YAML
    assert "sections ['pi_model'] configure plugins that are not enabled" in captured.err
    assert "train.eval_every (500) is more than train.steps (20)" in captured.err


def test_help_explains_every_argument_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("ssltrain 0.")
    for command, parts in {"train": ["--set KEY=VALUE", "dotted path", "'plugins=[pi_model, vat]'", "examples:",
                                     "--resume", "runs/latest"],
                           "eval": ["--which {last,best}", "highest test top-1", "--json", "examples:"],
                           "config": ["every check `train` makes", "examples:"]}.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for part in parts:
            assert part in text, (command, part)


def test_plugins_name_shows_every_setting(capsys):
    from ssltrain_plugins.mixmatch import MixMatch
    assert main(["plugins", "mixmatch"]) == 0
    out = capsys.readouterr().out
    assert "cannot run with sla" in out
    for key, field in MixMatch.Config.model_fields.items():
        line = next(line for line in out.splitlines() if line.split() and line.split()[0] == key)
        assert f"default {yaml.safe_dump(field.default, default_flow_style=True).splitlines()[0]}" in line, line
        assert " ".join(field.description.split()[:3]) in " ".join(out.split()), key
    assert "int (>= 1)" in out and "'interleave' | 'concat'" in out


def test_every_config_field_has_a_description():
    """`ssltrain plugins NAME` and `ssltrain keys` show them: core sections and every installed plugin."""
    from ssltrain.config import RunConfig
    from ssltrain.plugins import discover

    def missing(model, path):
        for key, field in model.model_fields.items():
            if field.exclude:
                continue
            if not field.description:
                yield path + key
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
                yield from missing(field.annotation, f"{path}{key}.")
    found = list(missing(RunConfig, ""))
    for name, cls in discover().items():
        if getattr(cls, "Config", None) is not None:
            found += missing(cls.Config, f"{name}.")
    assert not found, f"config fields without description=: {found}"


def test_keys_lists_core_settings(capsys):
    assert main(["keys", "train"]) == 0
    out = capsys.readouterr().out
    assert "train.log_every" in out and "about 100 points on short runs" in " ".join(out.split())
    assert "data.name" not in out


def test_plugins_lists_every_builtin_with_hooks(capsys):
    from ssltrain.plugins import discover
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in lines}
    assert set(discover()) <= names
    pi = next(line for line in lines if line.startswith("pi_model "))
    assert "ssl_unlabeled_loss" in pi and "weight=20.0" in pi and "ssltrain" in pi


def test_hooks_command_prints_whole_first_sentences(capsys):
    from ssltrain import hookspecs
    from ssltrain.cli import first_sentence
    assert main(["hooks"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in (n for n in dir(hookspecs) if n.startswith("ssl_")):
        sentence = first_sentence(getattr(hookspecs, name).__doc__)
        assert name in out and sentence in out and sentence.endswith("."), (name, sentence)
    assert first_sentence("""Save plugin state: set `state["x"]` to a dict of tensors,
        numbers and lists, e.g. counts. Modify hook.""") == \
        'Save plugin state: set `state["x"]` to a dict of tensors, numbers and lists, e.g. counts.'


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
