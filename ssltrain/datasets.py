"""Dataset loaders: each returns a whole dataset as in-memory tensors (``DatasetArrays``).

``load_dataset(name, root, download, **options)`` dispatches through ``DATASETS``. Images come back as
uint8 ``[N, C, H, W]`` with per-channel train mean/std (in [0, 1] units) for normalisation; vector data
comes back as float32 ``[N, D]``, already standardised with the train statistics.
"""
from __future__ import annotations

import csv
import difflib
import gzip
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .imagefiles import ImageSpec, find_image_files, path_at, read_image

DEFAULT_ROOT = "data"  # root for the torchvision datasets when none is given
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFoundError(Exception):
    """A dataset's files are missing; the message says what is missing, where it looked and how to get it."""


@dataclass
class DatasetArrays:
    """A whole dataset in memory. ``extra_unlabeled_x`` holds label-free images (e.g. STL-10's) or None."""

    train_x: torch.Tensor  # images: uint8 [N, C, H, W]; vectors: float32 [N, D] (standardised)
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    kind: str  # "image" or "vector"
    classes: list[str]
    mean: tuple[float, ...] | None  # per-channel mean of train images in [0, 1]; None for vectors
    std: tuple[float, ...] | None
    extra_unlabeled_x: torch.Tensor | None = None


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _labels(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.int64)


def channel_histograms(x: torch.Tensor) -> torch.Tensor:
    """Counts of each of the 256 levels per channel of uint8 images ``[N, C, H, W]``: int64 ``[C, 256]``."""
    return torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])])


def image_stats(x: torch.Tensor | None = None, histograms: torch.Tensor | None = None
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images ``[N, C, H, W]`` scaled to [0, 1], or of the
    images behind summed ``channel_histograms``.

    Exact: computed in float64 from each channel's 256-bin histogram, so memory stays O(one channel).
    """
    levels = torch.arange(256, dtype=torch.float64) / 255
    p = (channel_histograms(x) if histograms is None else histograms).double()
    p /= p.sum(1, keepdim=True)
    mean = (p * levels).sum(1)
    std = ((p * levels**2).sum(1) - mean**2).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _image_arrays(train_x, train_y, test_x, test_y, classes, extra=None) -> DatasetArrays:
    mean, std = image_stats(train_x)
    return DatasetArrays(train_x, train_y, test_x, test_y, len(classes), "image", list(classes), mean, std, extra)


def _vector_arrays(train_x, train_y, test_x, test_y, classes) -> DatasetArrays:
    """Standardise features with the train mean/std (a zero std counts as 1) and cast to float32."""
    train_x = torch.as_tensor(train_x, dtype=torch.float64)
    test_x = torch.as_tensor(test_x, dtype=torch.float64)
    mean, std = train_x.mean(0), train_x.std(0, correction=0)
    std[std == 0] = 1
    return DatasetArrays(((train_x - mean) / std).float(), train_y, ((test_x - mean) / std).float(), test_y,
                         len(classes), "vector", list(classes), None, None)


# ----------------------------------------------------------------------------- two moons
def load_two_moons(root=None, download=False, *, n_train=1000, n_test=1000, noise=0.1, seed=0) -> DatasetArrays:
    """Two interleaving half circles (as sklearn's make_moons) plus Gaussian noise; classes exactly
    balanced per split (up to one row). ``seed`` is the data seed, independent of the run seed."""
    g = torch.Generator().manual_seed(seed)

    def sample(n):
        y = torch.randperm(n, generator=g) % 2
        t = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
        upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
        lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
        x = torch.where(y[:, None] == 1, lower, upper)
        return x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64), y

    (train_x, train_y), (test_x, test_y) = sample(n_train), sample(n_test)
    return _vector_arrays(train_x, train_y, test_x, test_y, ["upper_moon", "lower_moon"])


def load_synthetic(root=None, download=False, *, n_train=1000, n_test=200, shape=(3, 32, 32),
                   num_classes=10, seed=0) -> DatasetArrays:
    """Random uint8 images with random labels, in any shape (e.g. CIFAR-shaped), for throughput
    benchmarks and tests without downloads. Nothing here is learnable."""
    g = torch.Generator().manual_seed(seed)

    def sample(n):
        x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        return x, torch.randint(0, num_classes, (n,), generator=g)

    (train_x, train_y), (test_x, test_y) = sample(n_train), sample(n_test)
    return _image_arrays(train_x, train_y, test_x, test_y, [str(c) for c in range(num_classes)])


# ----------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped if the name ends in .gz): bytes 0, 0, dtype code, ndim; then ndim
    big-endian int32 sizes; then the big-endian data. Returns a native-endian, writable array."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} ({math.prod(dims)} values) but the file holds {data.size}")
    return data.reshape(dims).astype(data.dtype.newbyteorder("="))


def _find_fashion_mnist(root: str) -> dict[str, str] | None:
    """Paths of the four IDX files (gzipped or not) in ``root`` or ``root/FashionMNIST/raw``, or None."""
    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
        found = {key: path for key, stem in FASHION_MNIST_FILES.items()
                 for path in (os.path.join(folder, stem + ".gz"), os.path.join(folder, stem))
                 if os.path.isfile(path)}
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    return None


def load_fashion_mnist(root=None, download=False) -> DatasetArrays:
    """Fashion-MNIST from IDX files; default root is where Debian's dataset-fashion-mnist installs them."""
    root = str(root or FASHION_MNIST_ROOT)
    files, failure = _find_fashion_mnist(root), ""
    if files is None and download:
        from torchvision.datasets import FashionMNIST
        try:
            FashionMNIST(root, download=True)
        except (RuntimeError, OSError) as e:
            failure = f" (data.download=true failed: {e})"
        files = _find_fashion_mnist(root)
    if files is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found{failure}: looked for {', '.join(FASHION_MNIST_FILES.values())} (each .gz or "
            f"uncompressed) in {root} and {os.path.join(root, 'FashionMNIST', 'raw')}. To get it: "
            f"`apt-get install dataset-fashion-mnist` (installs them to {FASHION_MNIST_ROOT}, the default root), "
            f"or set data.root=<folder holding those files>, or set data.download=true on a machine with "
            f"internet (torchvision saves them under <data.root>/FashionMNIST/raw).")
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise ValueError(f"Fashion-MNIST {split}: {len(arrays[f'{split}_x'])} images but "
                             f"{len(arrays[f'{split}_y'])} labels ({files[f'{split}_x']})")
    return _image_arrays(_tensor(arrays["train_x"][:, None]), _labels(arrays["train_y"]),
                         _tensor(arrays["test_x"][:, None]), _labels(arrays["test_y"]), FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------- torchvision datasets
def _torchvision_dataset(cls, root: str, download: bool, expected: str, **kwargs):
    """``cls(root, download=download, **kwargs)``, with missing/corrupt files (or a failed download)
    reported as DatasetNotFoundError naming the expected files and how to get them."""
    try:
        return cls(root, download=download, **kwargs)
    except (RuntimeError, OSError) as e:
        raise DatasetNotFoundError(
            f"{cls.__name__} not found or corrupted under {os.path.abspath(root)} (torchvision said: {e}). "
            f"Expected: {expected}. To get it: set data.download=true on a machine with internet "
            f"(torchvision downloads it into data.root), or copy those files into {root} "
            f"and set data.root={root}.") from e


def _load_cifar(cls, root, download) -> DatasetArrays:
    root = str(root or DEFAULT_ROOT)
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    expected = f"{cls.base_folder}/{{{','.join(names)}}} (the extracted {cls.filename})"
    train, test = (_torchvision_dataset(cls, root, download, expected, train=t) for t in (True, False))
    return _image_arrays(_tensor(train.data.transpose(0, 3, 1, 2)), _labels(train.targets),
                         _tensor(test.data.transpose(0, 3, 1, 2)), _labels(test.targets), train.classes)


def load_cifar10(root=None, download=False) -> DatasetArrays:
    """CIFAR-10 via torchvision (``<root>/cifar-10-batches-py``)."""
    from torchvision.datasets import CIFAR10
    return _load_cifar(CIFAR10, root, download)


def load_cifar100(root=None, download=False) -> DatasetArrays:
    """CIFAR-100 (fine labels) via torchvision (``<root>/cifar-100-python``)."""
    from torchvision.datasets import CIFAR100
    return _load_cifar(CIFAR100, root, download)


def load_svhn(root=None, download=False) -> DatasetArrays:
    """SVHN train/test via torchvision (``<root>/{train,test}_32x32.mat``); digit 0 has label 0."""
    from torchvision.datasets import SVHN
    root = str(root or DEFAULT_ROOT)
    expected = " and ".join(SVHN.split_list[s][1] for s in ("train", "test"))
    train, test = (_torchvision_dataset(SVHN, root, download, expected, split=s) for s in ("train", "test"))
    return _image_arrays(_tensor(train.data), _labels(train.labels), _tensor(test.data), _labels(test.labels),
                         [str(d) for d in range(10)])


def load_stl10(root=None, download=False, *, use_unlabeled_split=True) -> DatasetArrays:
    """STL-10 labeled train/test via torchvision (``<root>/stl10_binary``); ``extra_unlabeled_x`` is
    the 100k-image ``unlabeled`` split when ``use_unlabeled_split`` (else None)."""
    from torchvision.datasets import STL10
    root = str(root or DEFAULT_ROOT)
    names = ",".join(name for name, _ in STL10.train_list + STL10.test_list)
    expected = f"{STL10.base_folder}/{{{names}}} (the extracted {STL10.filename})"
    train, test = (_torchvision_dataset(STL10, root, download, expected, split=s) for s in ("train", "test"))
    extra = _tensor(_torchvision_dataset(STL10, root, False, expected, split="unlabeled").data) \
        if use_unlabeled_split else None
    classes = getattr(train, "classes", None) or [str(c) for c in range(10)]  # class_names.txt is optional
    return _image_arrays(_tensor(train.data), _labels(train.labels), _tensor(test.data), _labels(test.labels),
                         classes, extra)


# ----------------------------------------------------------------------------- image folder
def load_image_folder(root=None, download=False, *, image_size=32, grayscale=False, train=None, unlabeled=None,
                      test=None) -> DatasetArrays:
    """Every image of an image folder (layout in `imagefiles`; a run reads them through `streaming`, resident
    or streamed) decoded and resized to ``image_size`` x ``image_size``; the unlabeled images are
    ``extra_unlabeled_x``. Raises ConfigError for a bad layout, BadImageFile for an unreadable file."""
    files = find_image_files(root, train, unlabeled, test, grayscale)
    spec = ImageSpec(image_size, files.channels)

    def read(paths):
        return torch.stack([read_image(path_at(paths, i), spec) for i in range(len(paths))]) if len(paths) else None

    return _image_arrays(read(files.train), files.train_y, read(files.test), files.test_y, files.classes,
                         read(files.unlabeled))


# ----------------------------------------------------------------------------- tabular
def _parse_column(values: list[str]) -> np.ndarray:
    """Strings -> int64 array if all parse as ints, else float64 if all parse as floats, else str array."""
    for dtype in (np.int64, np.float64):
        try:
            return np.array(values, dtype=dtype)
        except ValueError:
            pass
    return np.array(values)


def _read_csv(path, label_column) -> tuple[np.ndarray, np.ndarray]:
    """Features (float64 [N, D]) and raw labels of a CSV. ``label_column`` is an index or a header name;
    the first row is a header if one of its feature fields is not a number (or a name was asked for)."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    if isinstance(label_column, str):
        if label_column not in rows[0]:
            raise ValueError(f"{path}: no column named {label_column!r} in the header {rows[0]}")
        col, has_header = rows[0].index(label_column), True
    else:
        col = label_column % len(rows[0])
        has_header = any(_parse_column([v]).dtype.kind not in "if" for i, v in enumerate(rows[0]) if i != col)
    rows = rows[has_header:]
    x = np.array([[v for i, v in enumerate(row) if i != col] for row in rows], dtype=np.float64)
    return x, _parse_column([row[col] for row in rows])


def load_tabular(root=None, download=False, *, label_column=-1, test_fraction=0.2, split_seed=0) -> DatasetArrays:
    """Vectors from ``root``: a ``.npz`` with x_train, y_train, x_test, y_test, or a ``.csv`` (label in
    ``label_column``, default last; a random ``test_fraction`` of rows, drawn with ``split_seed``, is the
    test set). Labels of any type map to 0..K-1 in sorted order; ``classes`` are their string forms."""
    if root is None or not os.path.isfile(root):
        raise DatasetNotFoundError(f"tabular: file {root!r} not found; set data.root=<path to a .npz with "
                                   f"x_train, y_train, x_test, y_test, or to a .csv>")
    suffix = Path(root).suffix.lower()
    if suffix == ".npz":
        keys = ("x_train", "y_train", "x_test", "y_test")
        with np.load(root, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ValueError(f"{root}: missing arrays {missing} (has {z.files})")
            train_x, train_y, test_x, test_y = (z[k] for k in keys)
    elif suffix == ".csv":
        train_x, train_y, test_x, test_y = _random_split(*_read_csv(root, label_column), test_fraction, split_seed)
    else:
        raise ValueError(f"tabular: {root} is neither .npz nor .csv")
    values, codes = np.unique(np.concatenate([train_y.reshape(-1), test_y.reshape(-1)]), return_inverse=True)
    codes = _labels(codes.reshape(-1))
    return _vector_arrays(train_x.reshape(len(train_x), -1), codes[:len(train_x)], test_x.reshape(len(test_x), -1),
                          codes[len(train_x):], [str(v) for v in values.tolist()])


SKLEARN_DATASETS = ("digits", "wine", "breast_cancer", "iris")


def load_sklearn(root=None, download=False, *, dataset="digits", test_fraction=0.2, split_seed=0) -> DatasetArrays:
    """A real tabular dataset bundled with scikit-learn (no download): ``digits`` (1797 x 64, 10 classes),
    ``wine`` (178 x 13, 3), ``breast_cancer`` (569 x 30, 2) or ``iris`` (150 x 4, 3). A random
    ``test_fraction`` of rows, drawn with ``split_seed``, is the test set; features are standardised."""
    if dataset not in SKLEARN_DATASETS:
        raise ValueError(f"sklearn: unknown dataset {dataset!r}; set data.options.dataset to one of {SKLEARN_DATASETS}")
    try:
        from sklearn import datasets as sk
    except ImportError:
        raise DatasetNotFoundError("sklearn datasets need scikit-learn: pip install 'ssltrain[tabular]' "
                                   "(or pip install scikit-learn)") from None
    bunch = getattr(sk, f"load_{dataset}")()
    train_x, train_y, test_x, test_y = _random_split(bunch.data, bunch.target, test_fraction, split_seed)
    return _vector_arrays(train_x, _labels(train_y), test_x, _labels(test_y), [str(c) for c in bunch.target_names])


def _random_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """(train_x, train_y, test_x, test_y): a random ``test_fraction`` of rows, drawn with ``seed``, for testing."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).numpy()
    test, train = np.split(order, [int(round(len(y) * test_fraction))])
    return x[train], y[train], x[test], y[test]


# ----------------------------------------------------------------------------- registry
DATASETS: dict[str, Callable[..., DatasetArrays]] = {
    "two_moons": load_two_moons,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "stl10": load_stl10,
    "image_folder": load_image_folder,
    "tabular": load_tabular,
    "sklearn": load_sklearn,
    "synthetic": load_synthetic,
}


def check_dataset(name: str, options: dict) -> None:
    """ValueError unless ``name`` is a key of DATASETS and ``options`` are keywords of its loader."""
    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint}; valid names: {', '.join(sorted(DATASETS))} (data.name)")
    valid = [p for p in inspect.signature(DATASETS[name]).parameters if p not in ("root", "download")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; valid options: {valid or 'none'}")


def load_dataset(name: str, root: str | None = None, download: bool = False, **options) -> DatasetArrays:
    """Load dataset ``name`` (a key of DATASETS) with its loader's keyword ``options``.

    Raises ValueError for an unknown name or option, DatasetNotFoundError when the files are missing.
    """
    check_dataset(name, options)
    return DATASETS[name](root=root, download=download, **options)
