"""Checkpoints: written atomically (temporary file, fsync, rename), read without unpickling
arbitrary objects (`torch.load(weights_only=True)`)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError


def save(state: dict, path: str | Path) -> None:
    """Write `state` (tensors, numbers, strings, lists, dicts) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict:
    """Read a checkpoint written by `save`, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; train first, or pass a run directory "
                              f"that has checkpoints/last.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from None


def find(run_dir_or_file: str | Path, which: str = "last") -> Path:
    """The checkpoint file of a run directory (checkpoints/<which>.pt), or the file itself."""
    p = Path(run_dir_or_file)
    return p if p.is_file() else p / "checkpoints" / f"{which}.pt"
