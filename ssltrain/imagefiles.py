"""Image files as training data: finding them (class folders, unlabeled folders, CSV file lists) and
decoding one file into a fixed-size uint8 image with torchvision's decoders.

Layout of `data.name: image_folder` under `data.root` (default: the working directory):
    train/<class>/**      labeled images, one subfolder per class
    unlabeled/**          optional: images at any depth, no labels
    test/<class>/**       test images
`data.options.train`, `unlabeled` and `test` name another folder or a CSV file list instead (relative to
`data.root`): a header with a `path` column and a `label` column (class names or ids; train rows with an
empty label are unlabeled, an unlabeled list's labels are ignored); relative paths are from the CSV's folder.
Paths are kept in numpy byte arrays: compact, and shared with forked decoding workers without copies.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
JPEG_MAGIC = b"\xff\xd8"
SUBSTITUTE_TRIES = 32  # a bad file is replaced by the next row of its set; this many bad rows in a row is fatal


class BadImageFile(Exception):
    """A file that cannot be read or decoded as an image."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class ImageSpec:
    """How a file becomes a uint8 [channels, size, size] image.

    crop: "resize" (the whole image, aspect not kept), "center" (shorter side to `size`, centre crop) or
    "random_resized_crop" (a random area fraction in `scale` and aspect ratio in [3/4, 4/3], then resized;
    drawn from the generator passed to `fit`; without one, a centre crop).
    """

    size: int
    channels: int = 3
    crop: str = "resize"
    scale: tuple[float, float] = (0.08, 1.0)

    @property
    def row_bytes(self) -> int:
        return self.channels * self.size * self.size


@dataclass
class ImageFiles:
    """The files of a run. Train row i < len(train) is train[i] (label train_y[i]); row len(train) + j is
    unlabeled[j] (no label), the convention of `splits.py` for extra label-free rows."""

    train: np.ndarray  # bytes paths
    train_y: Tensor  # int64 [len(train)]
    unlabeled: np.ndarray
    test: np.ndarray
    test_y: Tensor
    classes: list[str]
    channels: int

    @property
    def num_train_rows(self) -> int:
        return len(self.train) + len(self.unlabeled)

    def train_paths(self) -> "RowPaths":
        return RowPaths(self.train, self.unlabeled)


class RowPaths:
    """Row i -> path over two path arrays laid end to end (train rows, then unlabeled rows)."""

    def __init__(self, *parts: np.ndarray):
        self.parts, self.starts = parts, np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> str:
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return path_at(self.parts[part], i - int(self.starts[part]))


def path_array(paths: list[str]) -> np.ndarray:
    return np.array([os.fsencode(p) for p in paths], dtype=np.bytes_) if paths else np.array([], dtype="S1")


def path_at(paths: np.ndarray, i: int) -> str:
    return os.fsdecode(paths[int(i)])


# ----------------------------------------------------------------------------- finding files
def list_images(folder: Path) -> list[str]:
    """Image files under `folder` at any depth, sorted; hidden files and folders (".name") are skipped."""
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(here, f) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _class_folder(folder: Path, what: str) -> tuple[list[str], list[str]]:
    """(paths, class name of each path) of a folder with one subfolder of images per class."""
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        loose = len(list_images(folder))
        raise ConfigError(f"{what} folder {folder} has no class subfolders ({loose} images directly in it); put each "
                          f"class's images in {folder}/<class name>/, or list them in a CSV file with columns "
                          f"path,label and point data.options.{what} at it")
    paths, names = [], []
    for d in subdirs:
        images = list_images(d)
        if not images:
            raise ConfigError(f"class folder {d} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images to it "
                              f"or remove the folder")
        paths += images
        names += [d.name] * len(images)
    return paths, names


def _file_list(path: Path, what: str, labels: str) -> tuple[list[str], list[str]]:
    """(paths, label strings; "" where none) of a CSV file list with a header naming a `path` column and,
    optionally, a `label` column. labels: "required", "optional" or "ignored". Relative paths are taken
    from the CSV's folder."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    fix = f"the first line of {path} must name the columns, e.g. `path,label`, and each line give a path (and label)"
    if not rows or "path" not in rows[0]:
        raise ConfigError(f"{what} file list {path} has no `path` column (header: {rows[0] if rows else 'none'}); {fix}")
    header = rows[0]
    col, label_col = header.index("path"), header.index("label") if "label" in header else None
    if labels == "required" and label_col is None:
        raise ConfigError(f"{what} file list {path} has no `label` column; {fix}")
    paths, names = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ConfigError(f"{path}, line {line}: {len(row)} fields {row} where the header has {len(header)} "
                              f"{header}; {fix} (quote fields that contain commas)")
        name = row[label_col].strip() if label_col is not None and labels != "ignored" else ""
        if labels == "required" and not name:
            raise ConfigError(f"{path}, line {line}: no label for {row[col]}; every {what} image needs one")
        paths.append(str(path.parent / row[col]))
        names.append(name)
    if not paths:
        raise ConfigError(f"{what} file list {path} lists no files; {fix}")
    return paths, names


def _class_order(names: set[str], where: str) -> list[str]:
    """Class names in label order: numerically when every name is an integer, else alphabetically."""
    numeric = [n for n in names if n.lstrip("-").isdigit()]
    if numeric and len(numeric) < len(names):
        other = sorted(set(names) - set(numeric))[:3]
        raise ConfigError(f"the labels of {where} mix numbers ({sorted(numeric, key=int)[:3]}...) and names "
                          f"({other}...); a label column holds class ids or class names, not both")
    return sorted(names, key=int) if len(numeric) == len(names) else sorted(names)


def _resolve(base: Path, given: str | None, default: str, what: str) -> Path | None:
    if given is None:
        return base / default
    path = Path(given) if Path(given).is_absolute() else base / given
    if not path.exists():
        raise ConfigError(f"data.options.{what}: {path} does not exist; give a folder or a .csv file list "
                          f"(relative paths are taken from data.root)")
    return path


def find_image_files(root: str | None, train: str | None = None, unlabeled: str | None = None,
                     test: str | None = None, grayscale: bool = False) -> ImageFiles:
    """The files of an image_folder run (layout in the module docstring). Raises ConfigError naming the fix."""
    layout = "<root>/train/<class>/*.jpg|png|..., <root>/test/<class>/* and optionally <root>/unlabeled/**"
    base = Path(root) if root is not None else Path.cwd()
    if root is not None and not base.is_dir():
        raise ConfigError(f"image_folder: data.root={root} is not a folder; expected {layout} (example images: "
                          f"python tools/make_image_folder.py {root})")
    parts = {}
    for what, given, labels in (("train", train, "optional"), ("test", test, "required")):
        path = _resolve(base, given, what, what)
        if not path.exists():
            raise ConfigError(f"image_folder: {path} is missing; expected {layout} (set data.root=<that folder>, or "
                              f"data.options.{what}=<a folder or a .csv file list>)")
        parts[what] = _file_list(path, what, labels) if path.is_file() else _class_folder(path, what)
    train_paths, train_names = parts["train"]
    labeled = [i for i, n in enumerate(train_names) if n]
    if not labeled:
        raise ConfigError(f"image_folder: no labeled train images in {_resolve(base, train, 'train', 'train')}; "
                          f"give each labeled row a label")
    classes = _class_order({train_names[i] for i in labeled}, "the train images")
    index = {c: k for k, c in enumerate(classes)}
    test_paths, test_names = parts["test"]
    unknown = sorted(set(test_names) - set(classes))
    if unknown:
        raise ConfigError(f"image_folder: test classes {unknown[:5]} have no labeled train images (train classes: "
                          f"{classes[:10]}); add train images of those classes or remove them from the test set")
    extra = [train_paths[i] for i, n in enumerate(train_names) if not n]  # unlabeled rows of a train CSV
    path = _resolve(base, unlabeled, "unlabeled", "unlabeled") if root is not None or unlabeled else None
    if path is not None and path.exists():
        listed = _file_list(path, "unlabeled", "ignored")[0] if path.is_file() else list_images(path)
        if not listed:
            raise ConfigError(f"unlabeled folder {path} has no images ({', '.join(IMAGE_EXTENSIONS)}) at any depth; "
                              f"add images, or point data.options.unlabeled at the folder that holds them")
        extra += listed
    return ImageFiles(train=path_array([train_paths[i] for i in labeled]),
                      train_y=torch.tensor([index[train_names[i]] for i in labeled], dtype=torch.int64),
                      unlabeled=path_array(extra), test=path_array(test_paths),
                      test_y=torch.tensor([index[n] for n in test_names], dtype=torch.int64),
                      classes=classes, channels=1 if grayscale else 3)


# ----------------------------------------------------------------------------- decoding
def read_bytes(path: str) -> Tensor:
    """The file's bytes as a uint8 tensor; BadImageFile when it cannot be read or is empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadImageFile(path, exc.strerror or str(exc)) from None
    if not data:
        raise BadImageFile(path, "empty file")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode(path: str, data: Tensor, channels: int) -> Tensor:
    """Encoded bytes -> uint8 [channels, H, W] (JPEG, PNG, WebP, GIF by torchvision; other formats by PIL)."""
    from torchvision.io import ImageReadMode, decode_image
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        image = decode_image(data, mode=mode, apply_exif_orientation=True)
    except RuntimeError as exc:
        if "Unsupported image file" not in str(exc):
            raise BadImageFile(path, str(exc).rsplit(", ", 1)[-1].strip()) from None
        image = _decode_with_pil(path, data, channels)
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = (image.float() * (255 / 65535)).round().to(torch.uint8)
    return _with_channels(image[0] if image.dim() == 4 else image, channels)  # an animated GIF: its first frame


def _with_channels(image: Tensor, channels: int) -> Tensor:
    """[c, H, W] -> [channels, H, W]: GIF and WebP decoders ignore a grayscale request; alpha is dropped."""
    c = image.shape[0]
    if c == channels:
        return image
    if channels == 1:
        from torchvision.transforms.v2.functional import rgb_to_grayscale
        return rgb_to_grayscale(image[:3]) if c >= 3 else image[:1]
    return image[:3] if c >= 3 else image[:1].expand(3, -1, -1).contiguous()


def _decode_with_pil(path: str, data: Tensor, channels: int) -> Tensor:
    import io

    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            array = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadImageFile(path, f"not a readable image ({exc})") from None
    return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)


def crop_box(height: int, width: int, spec: ImageSpec, gen: torch.Generator | None) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the region `fit` resizes: the whole image, the centred square, or a random crop."""
    if spec.crop == "resize":
        return 0, 0, height, width
    if spec.crop == "random_resized_crop" and gen is not None:
        area = height * width
        for _ in range(10):
            u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
            target = area * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * u[0])
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
                return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def fit(image: Tensor, spec: ImageSpec, gen: torch.Generator | None = None) -> Tensor:
    """A decoded image [C, H, W] -> uint8 [C, size, size] (bilinear, antialiased), per `spec.crop`."""
    from torchvision.transforms.v2 import functional as F
    top, left, h, w = crop_box(image.shape[-2], image.shape[-1], spec, gen)
    if (h, w) == (spec.size, spec.size):
        return image[..., top:top + h, left:left + w]
    return F.resized_crop(image, top, left, h, w, [spec.size, spec.size], antialias=True)


def read_image(path: str, spec: ImageSpec, gen: torch.Generator | None = None) -> Tensor:
    """The file at `path` as uint8 [spec.channels, spec.size, spec.size]; BadImageFile if unreadable."""
    return fit(decode(path, read_bytes(path), spec.channels), spec, gen)


class BadFiles:
    """Reports unreadable files once each, per `data.on_bad_file`: "skip" (a line on stderr with the running
    count) or "error" (DataError naming the file and the fix)."""

    def __init__(self, on_bad_file: str):
        self.on_bad_file, self.seen = on_bad_file, {}

    def report(self, bad: list[tuple[str, str]]) -> None:
        for path, reason in bad:
            if path in self.seen:
                continue
            if self.on_bad_file == "error":
                raise DataError(f"cannot read image {path}: {reason}; replace or remove the file, or set "
                                f"data.on_bad_file=skip to skip unreadable files")
            self.seen[path] = reason
            print(f"data: skipped unreadable image {path} ({reason}); {len(self.seen)} skipped so far",
                  file=sys.stderr, flush=True)

    def __len__(self) -> int:
        return len(self.seen)
