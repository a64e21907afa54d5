"""Matplotlib figures for TensorBoard: the confusion matrix, per-class accuracy and a grid of unlabeled
samples with their pseudo-labels. Built with `matplotlib.figure.Figure` (no pyplot, no GUI backend) and
rendered by `render` to an RGB array for `SummaryWriter.add_image`."""
from __future__ import annotations

import numpy as np
import torch

RIGHT, WRONG, UNKNOWN = "#1a7f37", "#cf222e", "#57606a"  # title colours of the pseudo-label grid


def render(figure) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] of a matplotlib figure (any figure, pyplot's included)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100)


def _short(names: list[str], length: int = 14) -> list[str]:
    return [n if len(n) <= length else n[:length - 1] + "…" for n in names]


def confusion_figure(confusion: list[list[int]], classes: list[str], title: str):
    """Rows: true classes, columns: predicted classes; the colour and the upper number: the share of the
    true class's test rows (row-normalised, in %), the lower number: the count. Numbers are drawn up to
    20 classes, class names up to 40."""
    counts = np.asarray(confusion, dtype=np.int64)
    k = len(counts)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = min(max(4.0, 0.45 * k + 2.2), 14)  # inches: about 650 pixels wide for 10 classes
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(share * 100, cmap="Blues", vmin=0, vmax=100)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("% of the true class's test rows")
    if k <= 40:
        names = _short(classes)
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{100 * share[i, j]:.0f}%\n{counts[i, j]}", ha="center", va="center",
                        fontsize=6.5 if k <= 12 else 5, linespacing=1.0,
                        color="white" if share[i, j] > 0.55 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_class_figure(per_class: list[float], classes: list[str], top1: float, title: str):
    """Horizontal bars: each class's test accuracy in %, with the overall top-1 as a dashed line."""
    k = len(per_class)
    fig = _figure(6.5, min(max(2.5, 0.28 * k + 1.2), 30))
    ax = fig.add_subplot()
    rows = np.arange(k)
    ax.barh(rows, per_class, color=["#cf222e" if v < top1 else "#2f6fb3" for v in per_class])
    ax.axvline(top1, color="black", linestyle="--", linewidth=1, label=f"top-1 {top1:.2f}%")
    ax.set_yticks(rows, _short(classes, 24), fontsize=8 if k <= 40 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 109)
    ax.set_xlabel("test accuracy of the class (%)")
    if k <= 40:
        for r, v in zip(rows, per_class):
            ax.text(v + 1, r, f"{v:.1f}", va="center", fontsize=7)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def pseudo_label_figure(images: torch.Tensor, probs: torch.Tensor, hidden: torch.Tensor, classes: list[str],
                        title: str, columns: int = 8):
    """Unlabeled images [N, C, H, W] in [0, 1] under the class a plugin guessed and its probability
    (`probs` [N, C]); the label is green when the hidden true label agrees, red (with the true class) when
    not, grey when it is unknown (-1). The hidden labels are shown for diagnosis only; no loss uses them."""
    n, channels, height, width = images.shape
    rows = (n + columns - 1) // columns
    band, gap = height * 0.6, max(1, width // 10)  # room for two lines of text above each image; between images
    cell_w, cell_h = width + gap, height + band
    pictures = images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    canvas = np.ones((int(rows * cell_h), int(columns * cell_w), 3), dtype=np.float32)
    fig = _figure(1.25 * columns, (1.25 * cell_h / cell_w) * rows + 0.35)
    ax = fig.add_axes((0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    conf, guess = probs.float().max(-1)
    for i in range(n):
        top, left = int((i // columns) * cell_h + band), int((i % columns) * cell_w)
        canvas[top:top + height, left:left + width] = pictures[i] if channels == 3 else pictures[i][..., :1]
        truth, g = int(hidden[i]), int(guess[i])
        colour = UNKNOWN if truth < 0 else RIGHT if truth == g else WRONG
        label = f"{_short([classes[g]], 12)[0]} {conf[i]:.2f}" + (f"\nis {_short([classes[truth]], 12)[0]}"
                                                                 if colour == WRONG else "")
        ax.text(left + width / 2, top - band * 0.08, label, ha="center", va="bottom", fontsize=7, color=colour,
                linespacing=1.0)
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(title, fontsize=8, y=0.995, va="top")
    return fig
