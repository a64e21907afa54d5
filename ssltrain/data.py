"""The training data of a run: device-resident tensors, the SSL split, deterministic batch
streams and batched on-device augmentation. The data layer never branches on method names:
plugins ask for the views they need through `ctx.augment(raw, view)`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch
from torch import Tensor

from . import augment
from .config import DataConfig, RunConfig
from .datasets import DatasetNotFoundError, load_dataset
from .distributed import Dist
from .errors import ConfigError
from .imagefiles import ImageFiles
from .splits import make_split, remap_labels


FILE_DATASETS = ("image_folder",)  # read from image files: resident or streamed (streaming.py)


@dataclass
class SSLData:
    """Train and test rows on the device. Images are uint8 [N, C, H, W], vectors float [N, D].

    y_hidden: every train row's label in the run's label space (-1: unseen class or unknown);
    used for the labeled rows' targets and, for unlabeled rows, only for diagnostics.
    Streamed image files (`streamed`): `train_x` and `test_x` are `streaming.ImageRows`, which decode
    the rows they are indexed with (`data.train_x[idx]` -> uint8 tensor on the device), so plugins that
    read rows directly keep working; training batches come from the streamed `BatchSource`.
    files: the image files behind the rows (image_folder), else None. input_path: one line saying how the
    rows reach the device and why.
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
    files: ImageFiles | None = None
    streamed: bool = False
    input_path: str = ""


@dataclass
class SplitRows:
    """The run's split of train rows (`num_extra` label-free rows follow the labeled-dataset rows)."""

    labeled_idx: Tensor
    unlabeled_idx: Tensor
    y_hidden: Tensor
    test_y: Tensor  # remapped; -1 for unseen classes
    test_keep: Tensor  # bool: test rows of seen classes
    num_classes: int
    classes: list[str]


def split_rows(config: RunConfig, train_y: Tensor, num_classes: int, classes: list[str], num_extra: int,
               test_y: Tensor) -> SplitRows:
    """Draw the labeled/unlabeled split with the run's seed (`make_split`), append the extra rows to the
    unlabeled set, and remap labels for a class-mismatch setup."""
    cfg, mismatch = config.data, config.data.class_mismatch
    try:
        split = make_split(train_y, num_classes, cfg.num_labeled, config.seed,
                           include_labeled_in_unlabeled=cfg.include_labeled_in_unlabeled,
                           seen_classes=mismatch.seen_classes if mismatch else None,
                           unseen_ratio=mismatch.unseen_ratio if mismatch else 0.0,
                           num_unlabeled=cfg.num_unlabeled)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    n = len(train_y)
    y_hidden = torch.cat([remap_labels(train_y, split.label_map), torch.full((num_extra,), -1, dtype=torch.long)])
    test_y = remap_labels(test_y, split.label_map)
    return SplitRows(split.labeled_idx, torch.cat([split.unlabeled_idx, n + torch.arange(num_extra)]), y_hidden,
                     test_y, test_y >= 0, split.num_classes,
                     [classes[c] for c in mismatch.seen_classes] if mismatch else list(classes))


def build_data(config: RunConfig, device: torch.device) -> SSLData:
    """Load the dataset, draw the split with the run's seed, and move everything to `device`
    (image files: held on the device or streamed, see `streaming.build_file_data`)."""
    cfg = config.data
    if cfg.name in FILE_DATASETS:
        from .streaming import build_file_data  # streaming builds on this module
        return build_file_data(config, device)
    if cfg.image_size is not None or cfg.streaming is True:
        raise ConfigError(f"data.image_size and data.streaming=true apply to image files (data.name: "
                          f"{', '.join(FILE_DATASETS)}); {cfg.name} is loaded whole at its own size: remove them")
    try:
        arrays = load_dataset(cfg.name, root=cfg.root, download=cfg.download, **cfg.options)
    except DatasetNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data: {exc}") from None
    extra = arrays.extra_unlabeled_x  # e.g. STL-10's unlabeled split, appended after train
    rows = split_rows(config, arrays.train_y, arrays.num_classes, arrays.classes,
                      0 if extra is None else len(extra), arrays.test_y)
    train_x = arrays.train_x if extra is None else torch.cat([arrays.train_x, extra])
    return SSLData(train_x=train_x.to(device), y_hidden=rows.y_hidden.to(device),
                   test_x=arrays.test_x[rows.test_keep].to(device), test_y=rows.test_y[rows.test_keep].to(device),
                   labeled_idx=rows.labeled_idx.to(device), unlabeled_idx=rows.unlabeled_idx.to(device),
                   num_classes=rows.num_classes, kind=arrays.kind, input_shape=tuple(arrays.train_x.shape[1:]),
                   mean=arrays.mean, std=arrays.std, classes=rows.classes,
                   input_path=f"held on {device}: {sum(map(_mib, (train_x, arrays.test_x))):,.1f} MiB")


def _mib(x: Tensor) -> float:
    return x.numel() * x.element_size() / 2**20


def write_labeled(run_dir: Path, data: SSLData, resume: bool = False) -> None:
    """labeled_indices.json (the labeled train rows) and, for image files, labeled_files.json ([path, class]).
    Resuming, a different labeled_files.json means the files changed since the run began: a ConfigError."""
    (run_dir / "labeled_indices.json").write_text(json.dumps(data.labeled_idx.tolist()))
    if data.files is None:
        return
    paths, labels = data.files.train_paths(), data.y_hidden[data.labeled_idx].tolist()
    text = json.dumps([[paths[i], data.classes[y]] for i, y in zip(data.labeled_idx.tolist(), labels)], indent=0)
    saved = run_dir / "labeled_files.json"
    if resume and saved.exists() and saved.read_text() != text + "\n":
        raise ConfigError(f"the image files changed since {run_dir} began: its labeled images ({saved}) are not "
                          f"the ones drawn now; resume with the files as they were, or start a new run")
    saved.write_text(text + "\n")


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


@dataclass
class Rows:
    """This process's rows of one step, on the device: dataset indices and raw rows (uint8 images or
    float vectors) of the labeled and the unlabeled draw."""

    idx_l: Tensor
    x_l: Tensor
    idx_u: Tensor
    x_u: Tensor


class BatchSource(Protocol):
    """Where the loop's rows come from; held on the device (`ResidentSource`) or streamed from image
    files (`streaming.StreamedSource`). The rows of step s depend only on (seed, s)."""

    def rows(self, step: int) -> Rows:
        """This process's disjoint share of step `step`'s labeled and unlabeled rows."""

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(raw x, y) batches of this process's shard of the test set, on the device."""


class StepIndices:
    """The row indices of every step: two `BatchStream`s (labeled: seed, unlabeled: seed + 1) over the
    global batch, of which each process takes its disjoint slice."""

    def __init__(self, labeled_idx: Tensor, unlabeled_idx: Tensor, seed: int, dist: Dist, batch_l: int, batch_u: int):
        self.rank, self.batch_l, self.batch_u = dist.rank, batch_l, batch_u
        self.labeled = BatchStream(labeled_idx, batch_l * dist.world, seed)
        self.unlabeled = BatchStream(unlabeled_idx, max(batch_u, 1) * dist.world, seed + 1)

    def at(self, step: int) -> tuple[Tensor, Tensor]:
        """This process's labeled and unlabeled row indices of `step` (no unlabeled rows when batch_u is 0)."""
        r, bl, bu = self.rank, self.batch_l, self.batch_u
        li = self.labeled.at(step)[r * bl:(r + 1) * bl]
        return li, self.unlabeled.at(step)[r * bu:(r + 1) * bu] if bu else li[:0]


class ResidentSource:
    """Rows indexed out of the device-resident `data.train_x`."""

    def __init__(self, data: SSLData, seed: int, dist: Dist, batch_l: int, batch_u: int):
        self.data, self.dist = data, dist
        self.indices = StepIndices(data.labeled_idx, data.unlabeled_idx, seed, dist, batch_l, batch_u)

    def rows(self, step: int) -> Rows:
        li, ui = self.indices.at(step)
        return Rows(li, self.data.train_x[li], ui, self.data.train_x[ui])

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        shard = slice(self.dist.rank, None, self.dist.world)
        x, y = self.data.test_x[shard], self.data.test_y[shard]
        for lo in range(0, len(y), batch_size):
            yield x[lo:lo + batch_size], y[lo:lo + batch_size]


def batch_source(data: SSLData, config: RunConfig, dist: Dist, batch_l: int, batch_u: int) -> BatchSource:
    """The run's `BatchSource`: streamed when `data.streamed`, else device-resident."""
    if data.streamed:
        from .streaming import StreamedSource
        return StreamedSource(data, config, dist, batch_l, batch_u)
    return ResidentSource(data, config.seed, dist, batch_l, batch_u)


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
