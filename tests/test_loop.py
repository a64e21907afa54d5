"""End-to-end behaviour of the training loop: run directory, resume, errors, signals."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from conftest import make_config
from ssltrain import LossTerm, NonFiniteLossError, SSLPlugin, checkpoint, hookimpl
from ssltrain.errors import Interrupted
from ssltrain.loop import Trainer, train
from ssltrain.plugins import discover


def test_run_directory_contents(tmp_path):
    summary = train(make_config(plugins=["pi_model"]), tmp_path / "run")
    run = tmp_path / "run"
    for name in ["config.yaml", "labeled_indices.json", "metrics.jsonl", "train.jsonl", "summary.json", "console.log",
                 "checkpoints/last.pt", "checkpoints/best.pt"]:
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20]
    assert {"top1", "ece", "nll", "per_class_top1", "confusion"} <= set(evals[0])
    assert evals[0]["classes"] == ["upper_moon", "lower_moon"]  # beside per_class_top1
    assert len(json.loads((run / "labeled_indices.json").read_text())) == 8
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    for key in ["test_top1", "best_test_top1", "median_last_test_top1", "steps", "wall_seconds", "train_seconds",
                "train_samples_per_second"]:
        assert key in summary
    assert summary["steps"] == 20 and summary["test_top1"] == evals[-1]["top1"]
    assert summary["best_test_top1"] == max(e["top1"] for e in evals)
    # evaluations at steps 10 and 20 of 20: the median headline takes the second half only (step 20)
    assert summary["median_last_test_top1"] == evals[-1]["top1"] and summary["median_last_steps"] == [20, 20]
    for key in ["seed", "dataset", "num_labeled", "best_step", "started_at", "ended_at", "versions", "command"]:
        assert key in summary, key
    assert set(summary["versions"]) == {"ssltrain", "torch", "python"}
    rows = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]  # log_every 5
    assert {"loss/total", "loss/supervised", "loss/pi_model/consistency", "train/lr"} <= set(rows[0])
    assert rows[0]["loss/total"] == pytest.approx(rows[0]["loss/supervised"] + rows[0]["loss/pi_model/consistency"])
    assert "step 20/20" in (run / "console.log").read_text()


def test_labeled_split_is_class_balanced_and_seeded(tmp_path):
    a = Trainer(make_config("seed=1"), tmp_path).data
    b = Trainer(make_config("seed=2"), tmp_path).data
    assert torch.bincount(a.y_hidden[a.labeled_idx]).tolist() == [4, 4]
    assert not torch.equal(a.labeled_idx, b.labeled_idx)


def test_supervised_baseline_draws_no_unlabeled_data(tmp_path):
    trainer = Trainer(make_config(plugins=[]), tmp_path)
    assert not trainer.uses_unlabeled and trainer.draw(0).x_u.shape[0] == 0
    trainer = Trainer(make_config(plugins=["pi_model"]), tmp_path)
    assert trainer.draw(0).x_u.shape[0] == 32


@pytest.mark.parametrize("plugins", [[], ["pi_model"]])
def test_resume_continues_exactly(tmp_path, plugins):
    """A run stopped at step 10 and resumed ends with the same weights as an uninterrupted run."""
    ramp = ["pi_model.rampup_steps=5"] if plugins else []  # a fixed length: the default follows train.steps
    full = make_config("train.steps=20", "train.checkpoint_every=10", "model.options.dropout=0.2", *ramp, plugins=plugins)
    train(full, tmp_path / "full")
    half = make_config("train.steps=10", "train.checkpoint_every=10", "model.options.dropout=0.2", *ramp, plugins=plugins)
    train(half, tmp_path / "resumed")
    summary = train(full, tmp_path / "resumed", resume=True)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert summary["steps"] == 20 and b["step"] == 20
    for key in ["model", "ema"]:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["history"] == b["history"]
    metrics = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in metrics] == [10, 20]


def test_resume_refuses_a_different_config(tmp_path):
    from ssltrain import ConfigError
    train(make_config("train.steps=10"), tmp_path / "r")
    with pytest.raises(ConfigError, match="differ"):
        train(make_config("train.steps=20", "optim.lr=0.5"), tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match="--resume"):
        train(make_config("train.steps=10"), tmp_path / "r")


class Explode(SSLPlugin):
    """Its loss term becomes NaN from step 12 on."""

    @hookimpl
    def ssl_unlabeled_loss(self, batch, ctx):
        value = float("nan") if ctx.step >= 12 else 0.0
        return LossTerm("explode/boom", torch.full((batch.x_u.shape[0],), value))


def test_non_finite_loss_names_term_and_step_and_keeps_checkpoint(tmp_path):
    config = make_config(classes={"explode": Explode}, plugins=["explode"])
    with pytest.raises(NonFiniteLossError) as info:
        train(config, tmp_path / "r", classes={**discover(), "explode": Explode})
    message = str(info.value)
    assert "'explode/boom'" in message and "plugin 'explode'" in message and "step 12" in message
    good = checkpoint.load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert good["step"] == 10
    assert all(torch.isfinite(v).all() for v in good["model"].values())


class SendSignal(SSLPlugin):
    @hookimpl
    def ssl_step_end(self, ctx):
        if ctx.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_writes_a_checkpoint_then_resume_finishes(tmp_path):
    classes = {**discover(), "sig": SendSignal}
    config = make_config(classes={"sig": SendSignal}, plugins=["sig"])
    with pytest.raises(Interrupted, match="step 7"):
        train(config, tmp_path / "r", classes=classes)
    assert checkpoint.load(tmp_path / "r" / "checkpoints" / "last.pt")["step"] == 7
    assert train(config, tmp_path / "r", resume=True, classes=classes)["steps"] == 20


def test_checkpoint_is_atomic_and_safe_to_load(tmp_path):
    path = tmp_path / "c" / "x.pt"
    checkpoint.save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("fails while pickling")

    with pytest.raises(RuntimeError):
        checkpoint.save({"a": Boom()}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]  # no temporary left behind
    import pickle
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": os.getcwd}))
    from ssltrain import CheckpointError
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "evil.pt")


def test_ema_model_is_evaluated(tmp_path):
    trainer = Trainer(make_config("train.ema=0.5", "train.steps=5", "train.eval_every=5"), tmp_path)
    trainer.fit()
    ema = trainer.ema.module
    assert not all(torch.equal(p, q) for p, q in zip(ema.parameters(), trainer.model.parameters()))
    assert json.loads((tmp_path / "summary.json").read_text())["evaluated_model"] == "ema"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(tmp_path, amp):
    summary = train(make_config(f"train.amp={amp}", "train.steps=10", plugins=["pi_model"]), tmp_path)
    assert summary["steps"] == 10 and summary["test_top1"] > 0


def test_compiled_model_trains(tmp_path):
    summary = train(make_config("train.compile=true", "train.steps=4", "train.eval_every=4",
                                plugins=["pi_model"]), tmp_path)
    assert summary["steps"] == 4


IMAGES = ("data.name=synthetic", "data.options={n_train: 64, n_test: 32, shape: [1, 8, 8]}", "data.num_labeled=20",
          "data.augment={flip: true}", "model.name=small_cnn", "model.options={width: 4}")


@pytest.mark.parametrize("overrides, expected", [(IMAGES, True), ((), False)])
def test_channels_last_defaults_on_for_images_only(tmp_path, overrides, expected):
    trainer = Trainer(make_config(*overrides), tmp_path)
    assert trainer.augment.channels_last is expected
    if expected:
        conv = next(p for p in trainer.model.parameters() if p.dim() == 4 and p.shape[1] > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
