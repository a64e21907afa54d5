"""Image files as a run's data (`data.name: image_folder`): held decoded on the device when they fit,
streamed from disk when they do not (`data.streaming: auto|true|false`).

Streamed, each training process runs DataLoader workers; worker item s is the process's whole share of
step s: the row indices come from the same `StepIndices` as the device-resident path (so the batch of step
s depends only on (seed, s), and every process reads a disjoint shard of it), each file is decoded with
torchvision and resized (or randomly cropped, with a generator seeded by (seed, s, row)) to a fixed-size
uint8 image. Batches are pinned, copied to the device without blocking on a side stream, one step ahead
of the loop, and the loop's on-device augmentation makes the views as for resident data: plugins see the
same `SSLBatch` either way. A file that cannot be read is reported and replaced by the next row of its set
(labeled or unlabeled), or stops the run (`data.on_bad_file`); evaluation drops such test rows.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
from typing import Iterator

import numpy as np
import torch
import torchvision.io  # noqa: F401  the decoders, imported before workers fork (each would import them anew)
import torchvision.transforms.v2.functional  # noqa: F401
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig, RunConfig
from .data import Rows, SSLData, StepIndices, split_rows
from .datasets import channel_histograms, image_stats
from .distributed import Dist
from .errors import ConfigError, DataError
from .imagefiles import (JPEG_MAGIC, SUBSTITUTE_TRIES, BadFiles, BadImageFile, ImageFiles, ImageSpec, RowPaths,
                         decode, find_image_files, fit, read_bytes, read_image)

STATS_ROWS = 1024  # per-channel mean/std from this many train rows, evenly spaced (all rows when fewer)
CHUNK_ROWS = 256  # files per worker item when decoding whole sets (test set, resident data, statistics)
FOLDER_OPTIONS = ("train", "unlabeled", "test", "grayscale")


# ----------------------------------------------------------------------------- settings
def image_specs(cfg: DataConfig, channels: int) -> tuple[ImageSpec, ImageSpec]:
    """(training spec, evaluation spec): a random crop trains; evaluation takes the centre square."""
    s = cfg.stream
    train = ImageSpec(cfg.image_size, channels, s.crop, tuple(s.crop_scale))
    return train, ImageSpec(cfg.image_size, channels, "center" if s.crop == "random_resized_crop" else s.crop)


def num_workers(cfg: DataConfig) -> int:
    """`data.stream.workers`, or the CPUs per training process on this host less one (1 to 12)."""
    if cfg.stream.workers is not None:
        return cfg.stream.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(12, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def memory_budget(cfg: DataConfig, device: torch.device) -> tuple[float, str]:
    """(bytes, where the number comes from) that decoded images may take on the device."""
    if cfg.stream.memory_budget_gb is not None:
        return cfg.stream.memory_budget_gb * 2**30, "data.stream.memory_budget_gb"
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 4, f"a quarter of {device}'s memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4, "a quarter of the host's memory"


def decide(cfg: DataConfig, files: ImageFiles, spec: ImageSpec, device: torch.device) -> tuple[bool, str]:
    """(stream?, the one line that says so and why), per `data.streaming`."""
    n = files.num_train_rows + len(files.test)
    need = n * spec.row_bytes
    budget, origin = memory_budget(cfg, device)
    if cfg.streaming == "auto" and spec.crop == "random_resized_crop":
        stream, why = True, "data.stream.crop=random_resized_crop crops the files anew every step"
    elif cfg.streaming == "auto":
        stream = need > budget
        why = f"{'over' if stream else 'within'} the memory budget of {_gib(budget)} ({origin})"
    else:
        stream, why = cfg.streaming, f"data.streaming={str(cfg.streaming).lower()}"
    images = f"{n:,} images of {spec.channels}x{spec.size}x{spec.size} decode to {_gib(need)}"
    if not stream:
        return False, f"image files held decoded on {device}: {images}, {why}"
    return True, (f"image files streamed from disk: {images}, {why}; {num_workers(cfg)} decoding workers per "
                  f"process, {cfg.stream.prefetch} batches ahead each")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


# ----------------------------------------------------------------------------- building the data
def build_file_data(config: RunConfig, device: torch.device) -> SSLData:
    """Find the files, decide resident or streamed, draw the split with the run's seed (over the readable
    files when resident, over all listed files when streamed) and build the run's `SSLData`."""
    cfg = config.data
    unknown = sorted(set(cfg.options) - set(FOLDER_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for dataset {cfg.name!r}; valid options: {list(FOLDER_OPTIONS)}"
                          + (" (the image size is data.image_size)" if "image_size" in unknown else ""))
    if cfg.image_size is None:
        raise ConfigError(f"{cfg.name} needs data.image_size: the side in pixels every image is resized or cropped "
                          f"to (e.g. 32 for CIFAR-sized images, 224 for ImageNet-sized ones)")
    if cfg.streaming is False and cfg.stream.crop == "random_resized_crop":
        raise ConfigError("data.stream.crop=random_resized_crop crops while streaming; set data.streaming=auto "
                          "(or true), or choose data.stream.crop=resize or center")
    files = find_image_files(cfg.root, **cfg.options)
    train_spec, eval_spec = image_specs(cfg, files.channels)
    streamed, line = decide(cfg, files, train_spec, device)
    bad, workers = BadFiles(cfg.on_bad_file), num_workers(cfg)
    if not streamed:  # decode every file now; the split is drawn over the readable ones
        train_x, ok = decode_files(files.train_paths(), eval_spec, workers, bad)
        test_x, test_ok = decode_files(RowPaths(files.test), eval_spec, workers, bad)
        files, train_x, test_x = _readable(files, ok, test_ok), _rows(train_x, ok), _rows(test_x, test_ok)
    rows = split_rows(config, files.train_y, len(files.classes), files.classes, len(files.unlabeled), files.test_y)
    keep = rows.test_keep
    sample = torch.linspace(0, files.num_train_rows - 1, min(STATS_ROWS, files.num_train_rows)).round().long().unique()
    if streamed:  # statistics chunk by chunk: the sample is never held decoded
        chunks = decoded_chunks(files.train_paths(), eval_spec, workers, bad, sample)
        mean, std = image_stats(histograms=sum(channel_histograms(images[ok]) for _, images, ok in chunks))
        train_x = ImageRows(files.train_paths(), eval_spec, device, bad)
        test_x = ImageRows(RowPaths(files.test[keep.numpy()]), eval_spec, device, bad)
    else:
        mean, std = image_stats(train_x[sample])
        train_x, test_x = train_x.to(device), test_x[keep].to(device)
    return SSLData(train_x=train_x, y_hidden=rows.y_hidden.to(device), test_x=test_x,
                   test_y=rows.test_y[keep].to(device), labeled_idx=rows.labeled_idx.to(device),
                   unlabeled_idx=rows.unlabeled_idx.to(device), num_classes=rows.num_classes, kind="image",
                   input_shape=(files.channels, cfg.image_size, cfg.image_size), mean=mean, std=std,
                   classes=rows.classes, files=files, streamed=streamed, input_path=line)


def _rows(x: Tensor, ok: Tensor) -> Tensor:
    return x if ok.all() else x[ok]


def _readable(files: ImageFiles, ok: Tensor, test_ok: Tensor) -> ImageFiles:
    """`files` without the rows that could not be read (ok: over train then unlabeled rows)."""
    n = len(files.train)
    return ImageFiles(files.train[ok[:n].numpy()], files.train_y[ok[:n]], files.unlabeled[ok[n:].numpy()],
                      files.test[test_ok.numpy()], files.test_y[test_ok], files.classes, files.channels)


# ----------------------------------------------------------------------------- decoding sets of files
class FileChunks(Dataset):
    """Item k: the files of rows[k * chunk:(k + 1) * chunk] decoded -> (k, uint8 images, readable mask, bad
    [(path, reason)]); unreadable rows are left zero."""

    def __init__(self, paths: RowPaths, spec: ImageSpec, rows: Tensor | None = None, chunk: int = CHUNK_ROWS):
        self.paths, self.spec, self.chunk = paths, spec, chunk
        self.rows = torch.arange(len(paths)) if rows is None else rows

    def __len__(self) -> int:
        return -(-len(self.rows) // self.chunk)

    def __getitem__(self, k: int):
        rows = self.rows[k * self.chunk:(k + 1) * self.chunk].tolist()
        images = torch.zeros(len(rows), self.spec.channels, self.spec.size, self.spec.size, dtype=torch.uint8)
        ok, bad = torch.ones(len(rows), dtype=torch.bool), []
        for j, i in enumerate(rows):
            try:
                images[j] = read_image(self.paths[i], self.spec)
            except BadImageFile as exc:
                ok[j] = False
                bad.append((exc.path, exc.reason))
        return k, images, ok, bad


def _loader(dataset: Dataset, workers: int, sampler=None, prefetch: int = 2, pin: bool = False) -> DataLoader:
    """Items one at a time (no collation); a private generator, so iterating leaves torch's global RNG alone.
    Workers are forked on Linux even where the process was spawned (mp.spawn, Python >= 3.14's default):
    a spawned worker imports torch anew, seconds per start, and test sets start workers at every evaluation."""
    fork = workers > 0 and sys.platform.startswith("linux")
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=pin,
                      prefetch_factor=prefetch if workers else None, generator=torch.Generator(),
                      multiprocessing_context="fork" if fork else None)


def decoded_chunks(paths: RowPaths, spec: ImageSpec, workers: int, bad: BadFiles,
                   rows: Tensor | None = None) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(first position, uint8 images, readable mask) of consecutive chunks of the files of `rows` (default:
    all), decoded by `workers` processes; unreadable files are reported to `bad`."""
    chunks = FileChunks(paths, spec, rows)
    for k, images, ok, failed in _loader(chunks, min(workers, len(chunks))):
        bad.report(failed)
        yield k * chunks.chunk, images, ok


def decode_files(paths: RowPaths, spec: ImageSpec, workers: int, bad: BadFiles) -> tuple[Tensor, Tensor]:
    """Every file decoded: uint8 [N, C, S, S] (host) and the readable mask [N] (see `decoded_chunks`)."""
    out = torch.zeros(len(paths), spec.channels, spec.size, spec.size, dtype=torch.uint8)
    ok = torch.ones(len(paths), dtype=torch.bool)
    for start, images, good in decoded_chunks(paths, spec, workers, bad):
        out[start:start + len(images)], ok[start:start + len(images)] = images, good
    return out, ok


class ImageRows:
    """Stands in for `SSLData.train_x`/`test_x` when the data is streamed: `rows[key]` (an int, a slice,
    or an index tensor or list) decodes those files in this process -> uint8 [n, C, S, S] on the device.
    Plugins that read rows directly (SLA's and DS3L's evaluations) work on streamed data this way, at the
    cost of decoding what they read; an unreadable file gives a zero image (reported as usual)."""

    dtype = torch.uint8

    def __init__(self, paths: RowPaths, spec: ImageSpec, device: torch.device, bad: BadFiles):
        self.paths, self.spec, self.device, self.bad = paths, spec, device, bad
        self.shape = torch.Size((len(paths), spec.channels, spec.size, spec.size))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, int):
            return self[[key]][0]
        rows = torch.arange(len(self))[key if isinstance(key, slice) else torch.as_tensor(key).cpu()].reshape(-1)
        _, images, _, failed = FileChunks(self.paths, self.spec, rows, chunk=max(len(rows), 1))[0]
        self.bad.report(failed)
        return images.to(self.device)


# ----------------------------------------------------------------------------- the training stream
def crop_generator(seed: int, step: int, row: int) -> torch.Generator:
    """The generator of one row's random crop: a function of (seed, step, row) only."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 65_537 + row) % 2**63)


class StepBatches(Dataset):
    """Item `step`: this process's rows of that step, decoded -> (labeled indices, unlabeled indices,
    uint8 images [B_l + B_u, C, S, S], encoded [(row, JPEG bytes)] left for the device to decode, bad
    [(path, reason)], failure message or ""). A bad file is replaced by the next row of its set."""

    def __init__(self, paths: RowPaths, spec: ImageSpec, indices: StepIndices, labeled: Tensor, unlabeled: Tensor,
                 seed: int, decode_jpeg_on_device: bool):
        self.paths, self.spec, self.indices, self.seed = paths, spec, indices, seed
        self.sets, self.defer_jpeg = (labeled, unlabeled), decode_jpeg_on_device

    def generator(self, step: int, row: int) -> torch.Generator | None:
        """The random crop's generator of this process's `row` of `step` (rows of other processes differ)."""
        if self.spec.crop != "random_resized_crop":
            return None
        return crop_generator(self.seed, step, self.indices.rank * (self.indices.batch_l + self.indices.batch_u) + row)

    def read(self, which: int, i: int, step: int, row: int, bad: list, defer: bool = False) -> tuple[int, Tensor]:
        """(row index actually read, image or JPEG bytes) for row `i` of set `which` (0 labeled, 1 unlabeled)."""
        rows = self.sets[which]
        for _ in range(SUBSTITUTE_TRIES):
            path = self.paths[i]
            try:
                data = read_bytes(path)
                if defer and bytes(data[:2].tolist()) == JPEG_MAGIC:
                    return i, data
                return i, fit(decode(path, data, self.spec.channels), self.spec, self.generator(step, row))
            except BadImageFile as exc:
                bad.append((exc.path, exc.reason))
                i = int(rows[(int(torch.searchsorted(rows, i)) + 1) % len(rows)])
        raise DataError(f"{SUBSTITUTE_TRIES} unreadable images in a row, the last {bad[-1][0]} ({bad[-1][1]}); check "
                        f"that data.root and the file lists point at the images")

    def __getitem__(self, step: int):
        li, ui = self.indices.at(step)
        drawn = [(0, i) for i in li.tolist()] + [(1, i) for i in ui.tolist()]
        images = torch.zeros(len(drawn), self.spec.channels, self.spec.size, self.spec.size, dtype=torch.uint8)
        actual, encoded, bad = [], [], []
        try:
            for row, (which, i) in enumerate(drawn):
                i, image = self.read(which, i, step, row, bad, self.defer_jpeg)
                actual.append(i)
                if image.dim() == 1:
                    encoded.append((row, image))
                else:
                    images[row] = image
        except DataError as exc:  # raised in the training process (a worker's exception would carry its traceback)
            return li, ui, images, [], bad, str(exc)
        idx = torch.tensor(actual, dtype=torch.int64)
        return idx[:len(li)], idx[len(li):], images, encoded, bad, ""


class StreamedSource:
    """The `BatchSource` of streamed image files (see the module docstring)."""

    def __init__(self, data: SSLData, config: RunConfig, dist: Dist, batch_l: int, batch_u: int):
        cfg = config.data
        self.data, self.device, self.dist, self.bad = data, dist.device, dist, data.train_x.bad
        self.workers, self.prefetch = num_workers(cfg), cfg.stream.prefetch
        spec = image_specs(cfg, data.files.channels)[0]
        labeled, unlabeled = data.labeled_idx.cpu(), data.unlabeled_idx.cpu()
        indices = StepIndices(labeled, unlabeled, config.seed, dist, batch_l, batch_u)
        self.on_device = cfg.stream.decode == "device"
        self.batches = StepBatches(data.train_x.paths, spec, indices, labeled, unlabeled, config.seed, self.on_device)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._iter, self._next, self._ahead = None, -1, None

    def rows(self, step: int) -> Rows:
        if step != self._next:  # the first step, a resume, or a jump: (re)start the workers at `step`
            loader = _loader(self.batches, self.workers, itertools.count(step), self.prefetch, self.copy_stream is not None)
            self._iter = iter(loader)
            self._ahead = self._fetch(step)
        rows, self._next = self._ahead, step + 1
        self._ahead = self._fetch(step + 1)  # its copy overlaps this step's compute
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            for t in (rows.idx_l, rows.x_l, rows.idx_u, rows.x_u):
                t.record_stream(torch.cuda.current_stream(self.device))
        return rows

    def _fetch(self, step: int) -> Rows:
        li, ui, images, encoded, bad, failure = next(self._iter)
        self.bad.report(bad)
        if failure:
            raise DataError(failure)
        with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else contextlib.nullcontext():
            li, ui, x = (t.to(self.device, non_blocking=True) for t in (li, ui, images))
            if encoded:
                li, ui = self._decode_on_device(step, x, encoded, li, ui)
        return Rows(li, x[:len(li)], ui, x[len(li):])

    def _decode_on_device(self, step: int, x: Tensor, encoded: list, li: Tensor, ui: Tensor) -> tuple[Tensor, Tensor]:
        """Decode the JPEGs the workers left encoded, in one batch on the device (nvjpeg on CUDA), into `x`;
        a file the device cannot decode is read again on the CPU (and replaced if unreadable)."""
        from torchvision.io import ImageReadMode, decode_jpeg
        mode = ImageReadMode.GRAY if self.batches.spec.channels == 1 else ImageReadMode.RGB
        datas = [data for _, data in encoded]
        try:
            images = decode_jpeg(datas, mode=mode, device=self.device)
        except (RuntimeError, TypeError):  # a corrupt file in the batch, or no batched decoding (torchvision < 0.19)
            images = [_try_decode_jpeg(data, mode, self.device) for data in datas]
        idx, bad = torch.cat([li, ui]), []
        for (row, _), image in zip(encoded, images):
            if image is None:  # decoded (and cropped) on the CPU instead, or its replacement
                i, image = self.batches.read(int(row >= len(li)), int(idx[row]), step, row, bad)
                idx[row], x[row] = i, image.to(self.device)
            else:
                x[row] = fit(image, self.batches.spec, self.batches.generator(step, row))
        self.bad.report(bad)
        return idx[:len(li)], idx[len(li):]

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        test_x = self.data.test_x
        shard = torch.arange(self.dist.rank, len(test_x), self.dist.world)
        chunks = FileChunks(test_x.paths, test_x.spec, shard, chunk=batch_size)
        pin = self.copy_stream is not None
        for k, images, ok, bad in _loader(chunks, min(self.workers, len(chunks)), None, self.prefetch, pin):
            self.bad.report(bad)
            y = self.data.test_y[shard[k * batch_size:(k + 1) * batch_size].to(self.device)]
            images = images.to(self.device, non_blocking=True)
            yield (images, y) if ok.all() else (images[ok.to(self.device)], y[ok.to(self.device)])


def _try_decode_jpeg(data: Tensor, mode, device: torch.device) -> Tensor | None:
    from torchvision.io import decode_jpeg
    try:
        return decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        return None
