"""Checkpoints: written atomically (temporary file, fsync, rename), read without unpickling
arbitrary objects (`torch.load(weights_only=True)`); what a trainer saves and restores."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import yaml

from . import rng
from .data import write_labeled
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
            "final_eval": trainer.final_eval, "seconds": dict(trainer.seconds), "started_at": trainer.started_at,
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
    trainer.started_at = state.get("started_at", trainer.started_at)
    if len(state["rng"]) == trainer.dist.world:
        rng.set_state(state["rng"][trainer.dist.rank])
    else:
        torch.manual_seed(trainer.config.seed * 7919 + trainer.step * 131 + trainer.dist.rank)


def check_same_run(saved: dict, current: dict) -> None:
    """Resuming is allowed with other `train.*` settings (e.g. more steps), nothing else; a refusal names
    every differing key with the checkpoint's value and the new one."""
    diff = _differences({k: v for k, v in saved.items() if k != "train"},
                        {k: v for k, v in current.items() if k != "train"})
    if diff:
        shown = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in diff[:5])
        more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
        raise ConfigError(f"--resume with a different config: {shown}{more}; only train.* settings may change. "
                          f"Resume with the run's own config.yaml, or start a new run with another --out")


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value in a, value in b) for every leaf where two nested dicts differ ("<absent>" if missing)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [(prefix, a, b)]
    out = []
    for key in [*a, *(k for k in b if k not in a)]:
        name = f"{prefix}.{key}" if prefix else str(key)
        out += _differences(a.get(key, "<absent>"), b.get(key, "<absent>"), name)
    return out


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a run directory that is a file, that holds a run when not resuming, or that has no
    checkpoint to resume."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} is a file, not a directory; choose another --out")
    if resume and not (run_dir / "checkpoints" / "last.pt").is_file():
        raise CheckpointError(f"nothing to resume: checkpoint {str(run_dir / 'checkpoints' / 'last.pt')!r} not "
                              f"found; train without --resume, or pass the --out of an earlier run")
    if not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")


def write_run_files(trainer, resume: bool) -> None:
    """config.yaml, labeled_indices.json (and labeled_files.json) of a starting or resumed run (rank 0); a new
    run starts its train.jsonl and metrics.jsonl afresh."""
    if trainer.dist.is_main:
        run_dir = trainer.run_dir
        if not resume:
            for name in ("metrics.jsonl", "train.jsonl"):
                (run_dir / name).unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(trainer.config.to_dict(), sort_keys=False))
        write_labeled(run_dir, trainer.data, resume)
    trainer.dist.barrier()
