"""The training data of a run: device-resident tensors, the SSL split, deterministic batch
streams and batched on-device augmentation. The data layer never branches on method names:
plugins ask for the views they need through `ctx.augment(raw, view)`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import augment
from .config import DataConfig, RunConfig
from .datasets import DatasetNotFoundError, load_dataset
from .errors import ConfigError
from .splits import make_split, remap_labels


@dataclass
class SSLData:
    """Train and test tensors on the device. Images are uint8 [N, C, H, W], vectors float [N, D].

    y_hidden: every train row's label in the run's label space (-1: unseen class or unknown);
    used for the labeled rows' targets and, for unlabeled rows, only for diagnostics.
    """

    train_x: Tensor
    y_hidden: Tensor
    test_x: Tensor
    test_y: Tensor
    labeled_idx: Tensor
    unlabeled_idx: Tensor
    num_classes: int
    kind: str
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    classes: list[str]


def build_data(config: RunConfig, device: torch.device) -> SSLData:
    """Load the dataset, draw the split with the run's seed, and move everything to `device`."""
    cfg = config.data
    try:
        arrays = load_dataset(cfg.name, root=cfg.root, download=cfg.download, **cfg.options)
    except DatasetNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data: {exc}") from None
    mismatch = cfg.class_mismatch
    try:
        split = make_split(arrays.train_y, arrays.num_classes, cfg.num_labeled, config.seed,
                           include_labeled_in_unlabeled=cfg.include_labeled_in_unlabeled,
                           seen_classes=mismatch.seen_classes if mismatch else None,
                           unseen_ratio=mismatch.unseen_ratio if mismatch else 0.0,
                           num_unlabeled=cfg.num_unlabeled)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    train_x, y_hidden = arrays.train_x, remap_labels(arrays.train_y, split.label_map)
    unlabeled_idx = split.unlabeled_idx
    if arrays.extra_unlabeled_x is not None:  # e.g. STL-10's unlabeled split, appended after train
        extra = arrays.extra_unlabeled_x
        unlabeled_idx = torch.cat([unlabeled_idx, len(train_x) + torch.arange(len(extra))])
        train_x = torch.cat([train_x, extra])
        y_hidden = torch.cat([y_hidden, torch.full((len(extra),), -1, dtype=torch.long)])
    test_y = remap_labels(arrays.test_y, split.label_map)
    keep = test_y >= 0
    classes = [arrays.classes[c] for c in mismatch.seen_classes] if mismatch else list(arrays.classes)
    return SSLData(train_x=train_x.to(device), y_hidden=y_hidden.to(device),
                   test_x=arrays.test_x[keep].to(device), test_y=test_y[keep].to(device),
                   labeled_idx=split.labeled_idx.to(device), unlabeled_idx=unlabeled_idx.to(device),
                   num_classes=split.num_classes, kind=arrays.kind,
                   input_shape=tuple(arrays.train_x.shape[1:]), mean=arrays.mean, std=arrays.std,
                   classes=classes)


class BatchStream:
    """An endless stream of index batches over `indices`, reshuffled every pass.

    The batch of step s depends only on (seed, s): resuming at step s needs no stream state.
    Indices for many steps are drawn at once on the CPU and copied to the device in one
    non-blocking transfer, so steps do not wait on the host.
    """

    def __init__(self, indices: Tensor, batch_size: int, seed: int, chunk_rows: int = 2**20):
        self.indices, self.batch_size, self.seed = indices, batch_size, seed
        # at most 256 passes per chunk: one randperm each, cheap even for a handful of labels
        self.steps_per_chunk = max(1, min(chunk_rows, 256 * len(indices)) // batch_size)
        self._chunk, self._rows = -1, indices[:0]

    def _perm(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.indices), generator=gen)

    def _positions(self, start: int, stop: int) -> Tensor:
        """Stream positions [start, stop) as positions into `indices` (CPU)."""
        n = len(self.indices)
        parts = [self._perm(e)[max(start - e * n, 0):min(stop - e * n, n)] for e in range(start // n, (stop - 1) // n + 1)]
        return torch.cat(parts)

    def at(self, step: int) -> Tensor:
        chunk, offset = divmod(step, self.steps_per_chunk)
        if chunk != self._chunk:
            start = chunk * self.steps_per_chunk * self.batch_size
            positions = self._positions(start, start + self.steps_per_chunk * self.batch_size)
            if self.indices.is_cuda:
                positions = positions.pin_memory()
            self._rows = self.indices[positions.to(self.indices.device, non_blocking=True)]
            self._chunk = chunk
        return self._rows[offset * self.batch_size:(offset + 1) * self.batch_size]


class Augmenter:
    """Turns raw rows into views: `raw(x)` for the un-augmented input (images to float [0, 1]),
    then `view(raw, name)` with name in {"none", "weak", "strong"}, normalised for the model."""

    def __init__(self, cfg: DataConfig, data: SSLData, channels_last: bool):
        self.cfg, self.kind, self.channels_last = cfg.augment, data.kind, channels_last
        device = data.train_x.device
        self.mean = self.std = None
        if data.kind == "image" and cfg.normalize and data.mean is not None:
            self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
            self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)

    def raw(self, x: Tensor) -> Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

    def view(self, raw: Tensor, name: str) -> Tensor:
        a = self.cfg
        if self.kind == "vector":
            std = {"none": 0.0, "weak": a.noise_std, "strong": a.strong_noise_std}[name]
            return augment.gaussian_noise(raw, std) if std > 0 else raw
        if name == "weak":
            raw = augment.weak_augment(raw, pad=a.pad, flip=a.flip)
        elif name == "strong":
            raw = augment.rand_augment(raw, num_ops=a.num_ops, cutout_frac=a.cutout, pad=a.pad, flip=a.flip)
        elif name != "none":
            raise ValueError(f"unknown view {name!r}; use 'none', 'weak' or 'strong'")
        x = (raw - self.mean) / self.std if self.mean is not None else raw
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, x: Tensor, name: str) -> Tensor:
        """Raw dataset rows -> a view, in one call (evaluation uses name="none")."""
        return self.view(self.raw(x), name)
