"""torch.distributed support: one process per device, launched by torchrun.

`torchrun --nproc_per_node=N -m ssltrain train CONFIG.yaml` sets RANK/WORLD_SIZE/LOCAL_RANK; the run
then initialises the process group (nccl on GPUs, gloo on CPU), wraps the model in
DistributedDataParallel, gives each rank a disjoint slice of every global batch, shards evaluation,
and lets only rank 0 write logs and checkpoints. Plugins that keep statistics across steps
(estimates, thresholds, meta-network gradients) average them with `all_reduce_mean`.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and device (world 1: no process group)."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (no-op for one process)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (a host sync; use at log steps only)."""
        if self.world == 1:
            return flag
        return bool(self.sum_(torch.tensor([float(flag)], device=self.device)).item())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (picklable objects; checkpoints only)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def rank_batch(self, size: int, mode: str) -> int:
        """Rows this process draws per step for a configured batch size (`train.distributed.batch`)."""
        if mode == "per_rank":
            return size
        if size % self.world:
            raise ConfigError(f"batch size {size} is not divisible by the {self.world} processes; choose a "
                              f"multiple of {self.world} or set train.distributed.batch=per_rank")
        return size // self.world

    def uses_sync_bn(self, sync_bn: bool | None) -> bool:
        """SyncBatchNorm under torchrun: `train.distributed.sync_bn`, by default on CUDA only."""
        return self.world > 1 and (sync_bn if sync_bn is not None else self.device.type == "cuda")


def is_main_process() -> bool:
    """Rank 0 under torchrun (known before the process group exists), or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: str) -> Dist:
    """Join the torchrun process group when launched by torchrun, else a single process.

    device: the config's `train.device` ("auto", "cpu", "cuda", "cuda:1", ...).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if world == 1:
        chosen = device if device != "auto" else ("cuda" if use_cuda else "cpu")
        return Dist(0, 1, torch.device(chosen))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def prepare_model(model: nn.Module, d: Dist, sync_bn: bool | None, channels_last: bool) -> nn.Module:
    """The model on this process's device and memory format, with SyncBatchNorm where `d.uses_sync_bn`."""
    if d.uses_sync_bn(sync_bn):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(d.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def wrap_ddp(model: nn.Module, d: Dist, sync_bn: bool | None) -> nn.Module:
    """DistributedDataParallel around `model` under torchrun (buffers broadcast unless SyncBatchNorm), else `model`."""
    if d.world == 1:
        return model
    ddp = nn.parallel.DistributedDataParallel
    sync_key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
        else "broadcast_buffers"  # renamed in recent PyTorch
    return ddp(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
               **{sync_key: not d.uses_sync_bn(sync_bn)})


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over ranks in place (no-op outside a process group); for plugin statistics."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor
