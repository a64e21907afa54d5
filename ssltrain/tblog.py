"""Run outputs for people who look later: TensorBoard under `run_dir/tb`, `train.jsonl` (one row per log
step, keyed like the TensorBoard tags) and `metrics.jsonl` (one row per evaluation).

TensorBoard's Time Series page sorts groups (the part of a tag before the first "/") by name and opens
the first two. The layout:

    accuracy/top1                       test top-1 in %; then top1_best (the best so far), the figures
                                        top1_by_class and top1_confusion_matrix, and top1_median_last (at the end)
    eval/ece, eval/nll, eval/<plugin>/<name>   the rest of each evaluation (plugins' scalars included)
    loss/total, loss/supervised, loss/<plugin>/<term>   weighted contributions: they add up to loss/total
    <plugin>/<name>                     each plugin's diagnostics (ssl_metrics), in the plugin's group
    pseudo_labels/<plugin>              unlabeled samples with the labels a plugin guessed
    train/lr, train/samples_per_second, train/steps_per_second

Units: percentages end in `_pct`, except the test accuracies (`accuracy/*`, `eval/ece`, plugins'
`top1_*`), which are percentages as in every SSL paper; every other value is a plain number
(probabilities and fractions in [0, 1]). Every tag carries a description (the "i" of its card):
the core's below, a plugin's from its `descriptions` class attribute.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard import summary as tb_summary

from .figures import confusion_figure, per_class_figure, pseudo_label_figure, render
from .plugins import descriptions

DESCRIPTIONS = {
    "accuracy/top1": "Top-1 accuracy on the test set, in % (0-100), of the evaluated model (the EMA weights when "
                     "train.ema > 0).",
    "accuracy/top1_by_class": "Test accuracy of each class, in %; the dashed line is the overall top-1.",
    "accuracy/top1_confusion_matrix": "Confusion matrix on the test set: rows are true classes, columns predicted "
                                      "ones; colour and large number: % of the true class's rows; small number: "
                                      "count.",
    "eval/ece": "Expected calibration error on the test set, in % (15 equal-width confidence bins).",
    "eval/nll": "Mean negative log-likelihood of the true class on the test set, in nats.",
    "loss/total": "The loss the optimizer minimises: loss/supervised plus every weighted unlabeled term (mean "
                  "over the steps since the previous point).",
    "loss/supervised": "The supervised loss: mean over the labeled rows (cross-entropy unless a plugin owns "
                       "ssl_supervised_loss).",
    "train/lr": "Learning rate (the first parameter group) at this step.",
    "train/samples_per_second": "Training throughput: labeled + unlabeled rows per second over all processes, "
                                "since the previous point, evaluations excluded.",
    "train/steps_per_second": "Optimizer steps per second since the previous point, evaluations excluded.",
    "accuracy/top1_best": "The best test top-1 so far, in % (summary.json's best_test_top1 at the end).",
    "accuracy/top1_median_last": "summary.json's median_last_test_top1, in %: the median test top-1 over the last "
                                 "train.median_last evaluations of the second half of the run (at the end).",
}
TERM_PREFIX = ("Weighted contribution to loss/total (the term's weight, ramps included, times its mean over "
               "the unlabeled rows). ")


def rates(optimizer, steps: int, rows_per_step: int, seconds: float) -> dict[str, float]:
    """train/lr, and steps and rows per second over `steps` steps that took `seconds` (evaluations excluded)."""
    seconds = max(seconds, 1e-9)
    return {"train/lr": optimizer.param_groups[0]["lr"], "train/steps_per_second": steps / seconds,
            "train/samples_per_second": rows_per_step * steps / seconds}


def description(tag: str, plugin_descriptions: dict[str, str]) -> str:
    """The description of `tag`: the core's, or the plugin's for "<plugin>/<name>", "loss/<plugin>/<term>",
    "eval/<plugin>/<name>"."""
    if tag in DESCRIPTIONS:
        return DESCRIPTIONS[tag]
    group, _, rest = tag.partition("/")
    if group == "loss":
        return TERM_PREFIX + plugin_descriptions.get(rest, "")
    if group == "eval":
        return "At each evaluation. " + plugin_descriptions.get(rest, "")
    if group == "pseudo_labels":
        return (f"Unlabeled images of a training batch with the class {rest} guessed and its probability; green: "
                f"right, red: wrong (with the true class), grey: unknown, by the hidden labels (diagnosis only).")
    return plugin_descriptions.get(tag, "")


class RunLogger:
    """Writes TensorBoard events under `run_dir/tb`, training rows to train.jsonl, evaluations to metrics.jsonl.
    Plugins get it in `ssl_evaluate_end` for pictures: `logger.figure(tag, fig, step)`, `logger.image(...)`."""

    def __init__(self, run_dir: Path, start_step: int, total_steps: int, classes: list[str], plugins=None):
        """plugins: the run's plugin manager, whose plugins' `descriptions` describe their tags."""
        self.run_dir = Path(run_dir)
        # a resumed run drops what a crashed predecessor logged after its checkpoint (steps > start_step)
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.total, self.classes = total_steps, classes
        self.descriptions = descriptions(plugins) if plugins is not None else {}
        self._described: set[str] = set()
        self._figures_at: int | None = None  # the step of the latest evaluation figures

    def _write(self, tag: str, plugin, data, step: int) -> None:
        """One tensor-format value (what TensorBoard's fast loader reads descriptions from), with the tag's
        metadata and description the first time this logger writes the tag."""
        value = Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(data))
        if tag not in self._described:
            self._described.add(tag)
            value.metadata.CopyFrom(plugin.create_summary_metadata(
                display_name=tag, description=description(tag, self.descriptions)))
        self.writer._get_file_writer().add_summary(Summary(value=[value]), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self._write(tag, scalar_metadata, np.float32(value), step)

    def image(self, tag: str, image, step: int, dataformats: str = "CHW") -> None:
        """An image tensor or array ([3, H, W] by default, values in [0, 1] or uint8)."""
        png = tb_summary.image(tag, image, dataformats=dataformats).value[0].image
        self._write(tag, image_metadata, [str(png.width).encode(), str(png.height).encode(), png.encoded_image_string],
                    step)

    def figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure (rendered without pyplot)."""
        self.image(tag, render(figure), step, dataformats="HWC")

    def train_row(self, step: int, values: dict[str, float]) -> None:
        """A log step: the loss terms, learning rate, throughput and plugin diagnostics."""
        self.scalars(values, step)
        with open(self.run_dir / "train.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def evaluation(self, step: int, metrics: dict, best: float) -> None:
        """An evaluation: accuracy/top1 and the best so far with the figures, eval/* for the rest, a row of
        metrics.jsonl (with the class names beside per_class_top1)."""
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.scalars({"accuracy/top1" if k == "top1" else f"eval/{k}": v for k, v in scalars.items()}, step)
        self.scalars({"accuracy/top1_best": best}, step)
        if self._figures_due(step):
            self._figures_at = step
            title = f"step {step}, test top-1 {metrics['top1']:.2f}%"
            by_class = per_class_figure(metrics["per_class_top1"], self.classes, metrics["top1"],
                                        f"Accuracy by class, {title}")
            self.figure("accuracy/top1_by_class", by_class, step)
            self.figure("accuracy/top1_confusion_matrix",
                        confusion_figure(metrics["confusion"], self.classes, f"Confusion matrix, {title}"), step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics, "classes": self.classes}) + "\n")

    def _figures_due(self, step: int) -> bool:
        """Figures at most once per tenth of the run, and at its end (they take about a second to draw)."""
        return self._figures_at is None or step >= self.total or step - self._figures_at >= self.total / 10

    def pseudo_labels(self, batch, hidden: torch.Tensor, step: int, rows: int = 24) -> None:
        """For each `batch.extras["<plugin>/pseudo_labels"]` (class distributions [B_u, C] of the drawn rows
        `batch.raw_u`): a grid of the first `rows` images with the guessed classes (image data only);
        `hidden`: the drawn rows' hidden labels."""
        for key, probs in batch.extras.items():
            plugin, _, name = key.partition("/")
            if name != "pseudo_labels" or step != self._figures_at or batch.raw_u.dim() != 4 or not len(probs):
                continue
            n = min(rows, len(probs))
            fig = pseudo_label_figure(batch.raw_u[:n], probs[:n], hidden[:n], self.classes,
                                      f"{plugin}: guessed class and its probability at step {step} (green: right, "
                                      f"red: wrong, by the hidden labels; grey: unknown)")
            self.figure(f"pseudo_labels/{plugin}", fig, step)

    def run_config(self, config, hparams: dict, step: int) -> None:
        """At the start: the resolved config as text (a new run) and the run's settings for TensorBoard's
        HParams table. No experiment summary is written, so TensorBoard builds the table from every run:
        the columns are the union of the runs' settings (those that differ first) and, as metrics, the
        scalar tags in order, which puts accuracy/top1, top1_best, top1_median_last, eval/ece and eval/nll
        in the first five (shown by default)."""
        if step == 0:
            self.text("config", "```\n" + yaml.safe_dump(config.to_dict(), sort_keys=False) + "\n```")
        _, start, _ = tb_summary.hparams(hparams, {})
        self.writer._get_file_writer().add_summary(start)

    def summary(self, summary: dict, step: int) -> None:
        """The median headline at the last step, and the end of the HParams session."""
        self.scalars({"accuracy/top1_median_last": summary["median_last_test_top1"]}, step)
        _, _, end = tb_summary.hparams({}, {})  # the session's end (status: success)
        self.writer._get_file_writer().add_summary(end)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.writer.close()


def read_tensorboard(tb_dir: str | Path):
    """A run's TensorBoard events as TensorBoard's server reads them (tensor and legacy formats): an
    `EventAccumulator` with `.PluginTagToContent("scalars")`, `.Tensors(tag)`, `.SummaryMetadata(tag)`."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    events.Reload()
    return events


def scalar_values(events, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar tag from `read_tensorboard`."""
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


class NullLogger:
    """Stands in for RunLogger and Display on processes other than rank 0: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass
