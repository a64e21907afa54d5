"""What a user sees: the console display, the TensorBoard layout and files, and the tools after a plain install."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssltrain import display as display_module
from ssltrain.display import Display, loss_items, number, wrap
from ssltrain.tblog import read_tensorboard, scalar_values
from ssltrain.testing import run_tiny

ROOT = Path(__file__).resolve().parent.parent


def test_numbers_are_readable():
    assert [number(v) for v in (0.41234, 12.345, 1500.0, 0.0012345, 3.599e-06, 2.5e8, 0.0)] == \
        ["0.4123", "12.35", "1500", "0.001234", "3.6e-6", "2.5e8", "0"]
    assert number(0.003, trim=True) == "0.003" and number(1e-5, trim=True) == "1e-5"


def test_loss_line_adds_up_and_wraps_to_the_width():
    values = {"loss/total": 0.5, "loss/supervised": 0.3, "loss/mixmatch/l2": 0.15, "loss/ns3l/unlabeled": 0.04,
              "loss/ns3l/labeled": 0.01, "train/lr": 0.002}
    items = loss_items(values)
    assert items[:3] == ["loss 0.5000", "= supervised 0.3000", "+ mixmatch/l2 0.1500"]
    assert items[-1].strip() == "lr 0.002"
    lines = wrap(items, 40)
    assert all(len(line) <= 40 for line in lines) and " ".join(lines).split() == " ".join(items).split()


class CountingClock:
    """time.perf_counter that advances 0.05 s per call."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.05
        return self.now


def test_display_reads_the_device_sums_at_its_own_cadence(tmp_path, monkeypatch):
    """tick() runs every step; the loss sums are read (a host sync) about once per `interval`, not per step."""
    monkeypatch.setattr(display_module.time, "perf_counter", CountingClock())
    monkeypatch.setenv("COLUMNS", "80")
    reads = []
    real_stack = torch.stack
    monkeypatch.setattr(display_module.torch, "stack", lambda *a, **k: reads.append(1) or real_stack(*a, **k))
    stream = io.StringIO()
    shown = Display(tmp_path, mode="bar", interval=1.0, stream=stream)
    shown.start(0, 200, eval_every=100)
    sums = {"total": torch.tensor(0.0), "supervised": torch.tensor(0.0), "pi_model/consistency": torch.tensor(0.0)}
    for step in range(1, 201):
        for name in sums:
            sums[name] = sums[name] + 0.5
        shown.tick(step, sums, step, lr=3.599e-06)
    shown.close()
    assert 5 <= len(reads) <= 11  # 200 steps at 0.05 s each (plus a few clock reads): about 10 s
    text = stream.getvalue()
    assert "loss 0.5000 = supervised 0.5000 + pi_model/consistency 0.5000" in text and "lr 3.6e-6" in text
    assert "it/s" in text and "eta" in text
    for line in text.replace("\r", "\n").splitlines():  # tqdm redraws in place; every line fits 80 columns
        assert len(line.replace("\x1b[A", "")) <= 80, line


def test_plain_lines_when_not_a_terminal(tmp_path):
    """Not a terminal: plain lines at log steps, every 5% of the run, and one per evaluation; console.log too."""
    stream = io.StringIO()
    run_dir = tmp_path / "run"
    trainer_summary = run_tiny(run_dir, ["pi_model"], steps=40, overrides=("train.log_every=1",)).summary
    assert trainer_summary["steps"] == 40
    shown = Display(tmp_path / "other", mode="auto", stream=stream)
    assert not shown.live
    shown.start(0, 100, eval_every=50)
    for step in range(1, 101):
        shown.logged(step, {"loss/total": 1.0, "loss/supervised": 1.0, "train/lr": 0.1})
    shown.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20 and lines[0].startswith("step 5/100  loss 1.000 = supervised 1.000")
    assert "lr 0.1" in lines[0]
    console = (run_dir / "console.log").read_text()
    assert "ssltrain 0." in console and "eval @ 40: top-1" in console and "test accuracy" in console


def tensorboard_run(run_dir: Path):
    """The events as TensorBoard's server reads them, and the scalar and image tags."""
    events = read_tensorboard(run_dir / "tb")
    return events, list(events.PluginTagToContent("scalars")), list(events.PluginTagToContent("images"))


def test_tensorboard_layout_descriptions_figures_and_hparams(tmp_path):
    run = run_tiny(tmp_path / "run", ["pi_model"], steps=20)
    events, scalars, images = tensorboard_run(run.run_dir)
    # accuracy first (TensorBoard sorts groups by name and opens the first two), weighted terms under loss/
    assert sorted(scalars + images)[0] == "accuracy/top1"
    assert {"loss/total", "loss/supervised", "loss/pi_model/consistency"} <= set(scalars)
    assert not any(tag.startswith("pi_model/") or tag.startswith("core/") for tag in scalars)
    assert {"train/lr", "train/samples_per_second", "eval/ece", "eval/nll"} <= set(scalars)
    # HParams: no experiment summary (TensorBoard builds the table over all runs); its first five metric
    # columns, the scalar tags in order, are the accuracy headlines and the calibration
    assert sorted(scalars)[:5] == ["accuracy/top1", "accuracy/top1_best", "accuracy/top1_median_last", "eval/ece",
                                   "eval/nll"]
    median = run.summary["median_last_test_top1"]
    assert scalar_values(events, "accuracy/top1_median_last") == [(20, pytest.approx(median))]
    assert scalar_values(events, "accuracy/top1_best")[-1][1] == pytest.approx(run.summary["best_test_top1"])
    assert "_hparams_/experiment" not in events.PluginTagToContent("hparams")
    assert {"accuracy/top1_by_class", "accuracy/top1_confusion_matrix"} <= set(images)
    for tag in ["accuracy/top1", "loss/pi_model/consistency", "train/lr"]:
        assert events.SummaryMetadata(tag).summary_description, tag
    assert "in %" in events.SummaryMetadata("accuracy/top1").summary_description
    assert "Weighted contribution" in events.SummaryMetadata("loss/pi_model/consistency").summary_description
    assert "softmax" in events.SummaryMetadata("loss/pi_model/consistency").summary_description  # the plugin's own
    # the train.jsonl rows are keyed like the TensorBoard tags
    rows = [json.loads(line) for line in (run.run_dir / "train.jsonl").read_text().splitlines()]
    assert [v for _, v in scalar_values(events, "loss/pi_model/consistency")] == \
        pytest.approx([r["loss/pi_model/consistency"] for r in rows])
    # HParams: the session's settings and the metric columns
    hparams = events.SummaryMetadata("_hparams_/session_start_info").plugin_data
    assert hparams.plugin_name == "hparams" and b"pi_model.weight" in hparams.content
    assert b"num_labeled" in hparams.content
    width, height, _ = events.Tensors("accuracy/top1_confusion_matrix")[-1].tensor_proto.string_val
    assert int(width) >= 400 and int(height) >= 300  # a readable figure, not a 2x2-cell heat map


def test_logging_cadence_scales_with_short_runs():
    from ssltrain.config import TrainConfig
    assert TrainConfig(steps=300).log_every == 3  # 100 points
    assert TrainConfig(steps=50).log_every == 1 and TrainConfig(steps=10**6).log_every == 50
    assert TrainConfig(steps=300, log_every=7).log_every == 7


def test_mixmatch_shows_its_pseudo_labels(tmp_path):
    """A plugin's batch.extras["<plugin>/pseudo_labels"] (guesses for raw_u) becomes a TensorBoard sample grid."""
    run = run_tiny(tmp_path / "run", ["mixmatch"], steps=4, overrides=(
        "data.name=synthetic", "data.options={n_train: 64, n_test: 32, shape: [1, 8, 8], num_classes: 4}",
        "model.name=small_cnn", "model.options={width: 4}", "data.batch_size=8", "data.unlabeled_batch_size=8",
        "train.eval_every=2"))
    events, scalars, images = tensorboard_run(run.run_dir)
    assert "pseudo_labels/mixmatch" in images and "mixmatch/guess_acc_pct" in scalars
    description = events.SummaryMetadata("mixmatch/guess_acc_pct").summary_description
    assert "in %" in description and "[0, 1]" in events.SummaryMetadata("mixmatch/guess_max").summary_description


@pytest.mark.parametrize("tool", sorted(p.name for p in (ROOT / "tools").glob("*.py")))
def test_every_tool_runs_after_the_plain_install(tool):
    """`pip install -e .` brings no pytest and no scikit-learn: every tool's --help must still work."""
    code = ("import sys, runpy; sys.modules['pytest'] = None; sys.modules['sklearn'] = None; "
            f"sys.argv = ['{tool}', '--help']; runpy.run_path('tools/{tool}', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-2000:]
