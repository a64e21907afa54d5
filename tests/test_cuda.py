"""The CUDA subset (`pytest -m cuda`; deselected without -m): the hot path on a GPU.

Augmentation on the device, bf16/fp16 steps, channels_last, torch.compile, a checkpoint written on
the GPU and resumed on the CPU, an nccl process group of size 1. On a machine without CUDA these tests
skip, saying so; `SSLTRAIN_CUDA_TEST_DEVICE=cpu` runs them on the CPU instead (gloo for nccl), which is
how `tools/gpu_check.py --dry-run` rehearses them before any GPU time is spent.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os

import pytest
import torch
import torch.distributed as dist

from ssltrain import all_reduce_mean, checkpoint
from ssltrain import augment as A
from ssltrain.loop import Trainer
from ssltrain.tiny import tiny_config

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get("SSLTRAIN_CUDA_TEST_DEVICE", "cuda")


@pytest.fixture
def device() -> torch.device:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA is not available (SSLTRAIN_CUDA_TEST_DEVICE=cpu rehearses these tests on the CPU)")
    return torch.device(DEVICE)


def image_config(device, *overrides, plugins=("mixmatch",)):
    """A small image run: 16x16 RGB synthetic data, a width-8 small CNN, MixMatch, 6 steps."""
    return tiny_config(list(plugins), overrides=[
        "data.name=synthetic", "data.options={n_train: 256, n_test: 64, shape: [3, 16, 16]}", "data.num_labeled=40",
        "data.batch_size=16", "data.unlabeled_batch_size=16", "data.augment={pad: 2}", "model.name=small_cnn",
        "model.options={width: 8}", f"train.device={device}", "train.steps=6", "train.eval_every=3",
        "train.log_every=3", "mixmatch.rampup_steps=2", *overrides])


def first_loss(trainer: Trainer) -> float:
    """The total loss of step 0 (the batch, the plugins' batch edits and the closure), without a step."""
    ctx = trainer.context(0)
    batch = trainer.draw(0)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return trainer.make_closure(batch, ctx)().total.item()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@contextlib.contextmanager
def no_host_syncs(device):
    """On CUDA, any host-device synchronisation inside the block raises."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_augmentation_on_the_device_matches_the_cpu(device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 16, 16, generator=g)
    m = torch.rand(32, generator=g)
    dx, dy = torch.randint(-2, 3, (2, 32), generator=g)
    cy, cx = torch.randint(0, 16, (2, 32), generator=g)
    ops = {"translate": lambda t: A._translate(t, dx.to(t.device), dy.to(t.device), 2),
           "cutout": lambda t: A._cutout_at(t, cy.to(t.device), cx.to(t.device), 6)}
    for name, (op, top, _) in A.COLOR_OPS.items():
        ops[name] = lambda t, op=op, top=top: op(t, m.to(t.device) * top)
    for name, (op, top, _) in A.GEOMETRIC_OPS.items():
        ops[name] = lambda t, op=op, top=top: A._warp(t, op(t, m.to(t.device) * top))
    for name, op in ops.items():  # the same parameters give the same images on both devices
        out = op(x.to(device))
        assert out.device.type == device.type and out.shape == x.shape, name
        assert (out.cpu() - op(x)).abs().max() < 1e-4, name

    x = x.to(device)
    same = x[:1].expand(64, -1, -1, -1).contiguous()
    with no_host_syncs(device):
        strong, weak = A.rand_augment(same, pad=2), A.weak_augment(same, pad=2)
    for views in (strong, weak):
        assert views.device.type == device.type and torch.isfinite(views).all()
        assert 0 <= views.min() and views.max() <= 1
        differs = (views - views[:1]).flatten(1).abs().amax(1) > 1e-3  # per-sample randomness
        assert differs.float().mean() > 0.5


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_agree_with_fp32_and_train(device, amp, tmp_path):
    losses = {mode: first_loss(Trainer(image_config(device, f"train.amp={mode}"), tmp_path / mode))
              for mode in ("none", amp)}  # same seed: same weights, same batch
    assert abs(losses[amp] - losses["none"]) <= 0.03 * abs(losses["none"]), losses
    trainer = Trainer(image_config(device, f"train.amp={amp}"), tmp_path / "run")
    assert trainer.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    before = copy.deepcopy(trainer.model.state_dict())
    summary = trainer.fit()  # a non-finite loss would stop it with an error
    assert summary["steps"] == 6 and 0 <= summary["test_top1"] <= 100
    changed = [k for k, v in trainer.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    if amp == "fp16":
        assert trainer.scaler.is_enabled() and 0 < trainer.scaler.get_scale() < float("inf")


def test_channels_last_model_matches_contiguous(device, tmp_path):
    trainer = Trainer(image_config(device, "train.channels_last=true", "train.amp=none"), tmp_path)
    convs = [mod for mod in trainer.model.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    batch = trainer.draw(0)
    assert batch.x_l.is_contiguous(memory_format=torch.channels_last)
    contiguous = copy.deepcopy(trainer.model).to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        out_cl = trainer.model.eval()(batch.x_l)
        out = contiguous(batch.x_l.contiguous())
    assert relative_error(out_cl, out) < 1e-2  # cuDNN may pick TF32 kernels for either layout
    trainer.model.train()
    assert trainer.fit()["steps"] == 6


def test_checkpoint_written_on_the_gpu_resumes_on_the_cpu(device, tmp_path):
    trainer = Trainer(image_config(device, "train.steps=4", "train.eval_every=4"), tmp_path)
    trainer.fit()
    x = trainer.augment(trainer.data.test_x[:32], "none")
    with torch.no_grad():
        on_device = trainer.ema.module.eval()(x).float().cpu()
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert all(v.device.type == "cpu" for v in state["model"].values())

    cpu = Trainer(image_config("cpu", "train.steps=6", "train.eval_every=2"), tmp_path)
    cpu.load_state_dict(state)
    assert cpu.step == 4 and next(cpu.model.parameters()).device.type == "cpu"
    with torch.no_grad():
        on_cpu = cpu.ema.module.eval()(x.cpu()).float()
    assert relative_error(on_cpu, on_device) < 1e-2
    summary = cpu.fit()  # the CPU continues the GPU's run
    assert summary["steps"] == 6 and cpu.history[-1][0] == 6


def test_process_group_of_size_one(device, tmp_path):
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        pytest.fail(f"torch.distributed with {backend} is not available in this PyTorch build")
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        t = torch.arange(4.0, device=device)
        dist.all_reduce(t)
        assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert all_reduce_mean(t.clone()).tolist() == t.tolist()
        gathered = [None]
        dist.all_gather_object(gathered, {"rank": 0})
        assert gathered == [{"rank": 0}]

        trainer = Trainer(image_config(device, "train.amp=none"), tmp_path / "run")
        model = trainer.model
        ddp = torch.nn.parallel.DistributedDataParallel(
            copy.deepcopy(model), device_ids=[device.index or 0] if device.type == "cuda" else None)
        batch = trainer.draw(0)
        x, y = batch.x_l, batch.y_l
        for net in (model, ddp):
            torch.nn.functional.cross_entropy(net(x).float(), y).backward()
        for p, q in zip(model.parameters(), ddp.module.parameters()):  # world 1: DDP's averaged gradients are the plain ones
            assert relative_error(q.grad, p.grad) < 1e-3
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_compiled_step_matches_eager_and_trains(device, tmp_path, monkeypatch):  # last: the slowest
    if device.type == "cpu":  # the rehearsal: the same graph capture and autograd, without inductor's C++ builds
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = first_loss(Trainer(image_config(device), tmp_path / "eager"))  # bf16 on CUDA
    trainer = Trainer(image_config(device, "train.compile=true"), tmp_path / "compiled")
    assert trainer.train_model is not trainer.model  # the compiled wrapper
    assert abs(first_loss(trainer) - eager) <= 0.03 * abs(eager)
    summary = trainer.fit()
    assert summary["steps"] == 6 and 0 <= summary["test_top1"] <= 100
