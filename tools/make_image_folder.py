"""Write an image folder for `data.name: image_folder`: coloured shapes (one class per shape) on noisy
backgrounds, in JPEG and PNG files of assorted sizes.

    python tools/make_image_folder.py data/example_images          # the folder configs/folder_example.yaml reads
    python tools/make_image_folder.py OUT --train 20 --unlabeled 2000 --test 50 --size 64 --classes 4

Layout: OUT/train/<class>/*.jpg|png (`--train` per class), OUT/unlabeled/part<k>/<n>/*.jpg|png (`--unlabeled`
in all, nested two levels deep, no labels) and OUT/test/<class>/* (`--test` per class). `--size` is the
largest side of an image (each is between 0.6 and 1 times that, not square); `--size-exact` makes every
image exactly size x size; `--png-share` is the fraction of PNG files (the rest JPEG). The images of a seed
are the same on every machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "cross", "ring", "bar"]


def draw(rng: np.random.Generator, shape: str, width: int, height: int) -> Image.Image:
    """One image: a shape of random colour, size and place on a random smooth noisy background."""
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0, 20, (height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in (base + rng.integers(90, 166, 3)) % 256)
    r = min(width, height) * rng.uniform(0.2, 0.4)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        pen.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=colour)
        pen.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=colour)
    elif shape == "ring":
        pen.ellipse(box, outline=colour, width=max(1, int(r / 3)))
    else:
        pen.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=colour)
    return image


def write(rng: np.random.Generator, path: Path, shape: str, size: int, exact: bool, png_share: float) -> None:
    width, height = (size, size) if exact else (int(size * rng.uniform(0.6, 1)), int(size * rng.uniform(0.6, 1)))
    image = draw(rng, shape, width, height)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rng.random() < png_share:
        image.save(path.with_suffix(".png"))
    else:
        image.save(path.with_suffix(".jpg"), quality=90)


def make_image_folder(out: str | Path, train: int = 10, unlabeled: int = 400, test: int = 25, size: int = 48,
                      classes: int = 4, seed: int = 0, exact: bool = False, png_share: float = 0.5,
                      per_folder: int = 100) -> Path:
    """Write the folder (see the module docstring) and return its path."""
    out, rng = Path(out), np.random.default_rng(seed)
    shapes = SHAPES[:classes]
    for split, n in (("train", train), ("test", test)):
        for shape in shapes:
            for i in range(n):
                write(rng, out / split / shape / f"{i:05d}", shape, size, exact, png_share)
    for i in range(unlabeled):
        shape = shapes[rng.integers(len(shapes))]
        write(rng, out / "unlabeled" / f"part{i // (per_folder * 10)}" / f"{i // per_folder % 10}" / f"{i:07d}",
              shape, size, exact, png_share)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=10, help="labeled train images per class")
    p.add_argument("--unlabeled", type=int, default=400, help="unlabeled images in all")
    p.add_argument("--test", type=int, default=25, help="test images per class")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--size-exact", action="store_true")
    p.add_argument("--png-share", type=float, default=0.5, help="fraction of PNG files (the rest are JPEG)")
    p.add_argument("--classes", type=int, default=4, choices=range(2, len(SHAPES) + 1))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty; choose a new folder")
    make_image_folder(args.out, args.train, args.unlabeled, args.test, args.size, args.classes, args.seed,
                      args.size_exact, args.png_share)
    total = (args.train + args.test) * args.classes + args.unlabeled
    print(f"wrote {total} images to {args.out} (train/<class>/, unlabeled/**, test/<class>/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
