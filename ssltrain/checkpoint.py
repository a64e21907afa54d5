"""Checkpoints: written atomically (temporary file, fsync, rename), read without unpickling
arbitrary objects (`torch.load(weights_only=True)`); what a trainer saves and restores."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from . import rng
from .errors import CheckpointError, ConfigError


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


def trainer_state(trainer, plugin_state: dict) -> dict:
    """Everything a resume needs: step, config, model, EMA, optimizer, scheduler, grad scaler, the
    plugins' state, the evaluation history and every process's RNG state (a collective under torchrun)."""
    return {"step": trainer.step, "config": trainer.config.to_dict(), "model": trainer.model.state_dict(),
            "ema": trainer.ema.module.state_dict() if trainer.ema is not None else None,
            "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(), "plugins": plugin_state, "history": trainer.history,
            "final_eval": trainer.final_eval, "seconds": dict(trainer.seconds),
            "rng": trainer.dist.gather(rng.get_state())}


def restore_weights(trainer, state: dict) -> None:
    """Load the model (and EMA) weights of `state` into `trainer`; CheckpointError when they do not fit."""
    try:
        trainer.model.load_state_dict(state["model"])
        if trainer.ema is not None:
            trainer.ema.module.load_state_dict(state["ema"] if state["ema"] is not None else state["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint does not fit this model: {exc}") from None


def restore_training(trainer, state: dict) -> None:
    """Load optimizer, scheduler, scaler, step, history and RNG state (the plugins' state is the loop's
    `ssl_load_state_dict` call). With the processes that wrote it the continuation is exact; with another
    number of processes every rank gets a fresh deterministic stream."""
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.step, trainer.history, trainer.seconds = state["step"], state["history"], state["seconds"]
    trainer.final_eval = state.get("final_eval", {})  # absent in checkpoints written before final_eval existed
    if len(state["rng"]) == trainer.dist.world:
        rng.set_state(state["rng"][trainer.dist.rank])
    else:
        torch.manual_seed(trainer.config.seed * 7919 + trainer.step * 131 + trainer.dist.rank)


def check_same_run(saved: dict, current: dict) -> None:
    """Resuming is allowed with other `train.*` settings (e.g. more steps), nothing else."""
    diff = sorted(k for k in set(saved) | set(current) if k != "train" and saved.get(k) != current.get(k))
    if diff:
        raise ConfigError(f"--resume with a different config: sections {diff} differ from the checkpoint's; "
                          f"resume with the run's own config.yaml, or start a new run with another --out")
