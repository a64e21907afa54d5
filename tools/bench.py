"""Time the ssltrain training step against a hand-written PyTorch loop doing the same math.

    python tools/bench.py --shape mixmatch [--device cuda] [--steps 20] [--warmup 3]
                          [--amp bf16] [--channels-last] [--compile [MODE]] [--json out.json]

Shapes (synthetic data in the right shape; nothing is downloaded):
  supervised  WRN-28-2, 32x32, 64 labeled rows                                  plugins: []
  mixmatch    WRN-28-2, 32x32, 64 labeled + 2 x 64 unlabeled views (interleaved) plugins: [mixmatch]
  heavy       WRN-28-2, 32x32, 64 labeled + 448 unlabeled x (weak + strong view) = 960 images
                                                                                plugins: [pi_model]
  small_cnn   SmallCNN, 28x28x1, 64 labeled + 64 unlabeled x 2 views          plugins: [pi_model]
  small_cnn_mixmatch  the Fashion-MNIST MixMatch step of configs/mixmatch_fashion_mnist.yaml: SmallCNN
              (width 32, BN momentum 0.01), 28x28x1, 64 labeled + 2 x 64 unlabeled views   plugins: [mixmatch]

`--compile` compiles the model of both loops as `train.compile: true` does; `--compile reduce-overhead`
(CUDA graphs through torch.compile) or another torch.compile mode passes that mode, and
`--compile-backend` another backend (aot_eager: graph capture without inductor, for rehearsals on a CPU).
`--toy` shrinks every shape (smallest widths and depths, batches / 8) to rehearse the tool in seconds.

Both loops use the same model, batch shapes, augmentation functions, losses, Adam and EMA. Step
times are medians over the timed steps (warm-up excluded; CUDA events on GPU), measured in turns
(ssltrain, plain, ssltrain, plain, ...) so that a busy machine slows both alike. Prints steps/s,
samples/s, peak memory, the ratio ssltrain / plain, the share of step time spent in pluggy's
hook dispatch, and the step's matmul/convolution FLOPs with the rate ssltrain reaches (to compare
with the device's peak). On CPU the tool re-runs itself under tcmalloc when Debian's libtcmalloc-minimal4 is
installed (--allocator system to keep glibc malloc): see docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ssltrain import SSLPlugin, augment, hookimpl
from ssltrain.loop import Trainer
from ssltrain.models import build_backbone
from ssltrain.optim import EMA, frozen_bn
from ssltrain.plugins import discover
from ssltrain.tiny import tiny_config

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
SHAPES = {  # name: (model, model options, image shape, labeled, unlabeled, plugins)
    "supervised": ("wrn", {}, (3, 32, 32), 64, 0, []),
    "mixmatch": ("wrn", {}, (3, 32, 32), 64, 64, ["mixmatch"]),
    "heavy": ("wrn", {}, (3, 32, 32), 64, 448, ["pi_model"]),
    "small_cnn": ("small_cnn", {}, (1, 28, 28), 64, 64, ["pi_model"]),
    "small_cnn_mixmatch": ("small_cnn", {"width": 32, "bn_momentum": 0.01}, (1, 28, 28), 64, 64, ["mixmatch"]),
}
TOY_MODELS = {"wrn": {"depth": 10, "widen_factor": 1}, "small_cnn": {"width": 4}}  # --toy: the smallest of each
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def shape_spec(shape: str, args) -> tuple:
    """SHAPES[shape], shrunk under --toy (smallest model, batches / 8)."""
    model, options, image, labeled, unlabeled, plugins = SHAPES[shape]
    if getattr(args, "toy", False):
        options, labeled, unlabeled = {**options, **TOY_MODELS.get(model, {})}, labeled // 8, unlabeled // 8
    return model, options, image, labeled, unlabeled, plugins


def compile_model(module: torch.nn.Module, args) -> torch.nn.Module:
    """torch.compile(module) with --compile's mode and --compile-backend (the eager module without --compile)."""
    if not args.compile:
        return module
    mode = None if args.compile == "default" else args.compile
    return torch.compile(module, mode=mode, backend=getattr(args, "compile_backend", "inductor"))


def uses_cuda_graphs(args) -> bool:
    """Compile modes that replay CUDA graphs want each training step marked (torch.compiler.cudagraph_mark_step_begin)."""
    return bool(args.compile) and args.compile in ("reduce-overhead", "max-autotune")


def bench_config(shape: str, args, steps: int):
    model, options, image, labeled, unlabeled, plugins = shape_spec(shape, args)
    overrides = [
        "data.name=synthetic", f"data.options={{n_train: 4096, n_test: 256, shape: {list(image)}}}",
        "data.num_labeled=1000", f"data.batch_size={labeled}", f"data.unlabeled_batch_size={max(unlabeled, 1)}",
        f"model.name={model}", f"model.options={json.dumps(options)}", "optim.lr=0.002",
        f"train.steps={steps}", f"train.eval_every={steps}", f"train.log_every={steps}", "train.ema=0.999",
        f"train.device={args.device}", f"train.amp={args.amp}", "train.compile=false",  # compiled by compile_model
        *([] if args.channels_last is None else [f"train.channels_last={str(args.channels_last).lower()}"]),
        "train.progress=lines",
        "pi_model.view=strong", "pi_model.weight=10", "mixmatch.rampup_steps=16384"]
    if args.threads:
        overrides.append(f"train.cpu_threads={args.threads}")
    config = tiny_config(plugins, overrides=overrides)
    for name in ("pi_model", "mixmatch"):  # keep only the active plugins' sections
        if name not in plugins:
            config.plugin_configs.pop(name, None)
    return config


class Clock:
    """Timestamps of consecutive events: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class StepClock(SSLPlugin):
    """Marks the end of every training step (and, under CUDA graphs, the start of the next one)."""

    clock: Clock
    cuda_graphs = False

    @hookimpl
    def ssl_step_end(self):
        self.clock.mark()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()


def time_ssltrain(shape: str, args) -> tuple[list[float], int, float]:
    """Step times of ssltrain's own loop, hook calls per step, peak memory (bytes)."""
    config = bench_config(shape, args, args.warmup + args.steps)
    config.plugins.append("clock")
    classes = {**discover(), "clock": StepClock}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, classes)
        trainer.train_model = compile_model(trainer.train_model, args)
        step_clock = trainer.pm.get_plugin("clock")
        clock = step_clock.clock = Clock(trainer.device)
        step_clock.cuda_graphs = uses_cuda_graphs(args)
        calls = []
        undo = trainer.pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.append(name), lambda *a: None)
        trainer.draw(0)  # warm the index stream
        _reset_peak(trainer.device)
        clock.mark()
        trainer.fit()
        undo()
    steps_total = args.warmup + args.steps
    per_step = sum(1 for c in calls) / steps_total  # includes the final log/eval calls (a small overcount)
    return clock.intervals()[args.warmup:], round(per_step), _peak(trainer.device)


def time_plain(shape: str, args) -> tuple[list[float], float, int]:
    """The same math as a hand-written PyTorch loop (no hooks, no plugins): step times, peak memory
    (bytes), and the FLOPs of one step's matrix multiplications and convolutions (counted on an
    extra, untimed eager step)."""
    config = bench_config(shape, args, args.warmup + args.steps)
    trainer = Trainer(config, tempfile.mkdtemp(), discover())  # only to share the data tensors on the device
    data, device = trainer.data, trainer.device
    model_name, options, _, b_l, b_u, plugins = shape_spec(shape, args)
    torch.manual_seed(0)
    model = build_backbone(model_name, data.num_classes, data.input_shape, **options).to(device)
    memory_format = torch.channels_last if trainer.augment.channels_last else torch.preserve_format
    model = model.to(memory_format=memory_format)
    net = model  # compiled below, after the FLOP count
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.Adam([{"params": decay}, {"params": rest}], lr=0.002,
                                 **({"fused": True} if device.type == "cuda" else {}))
    ema = EMA(model, 0.999)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    autocast = torch.autocast(device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None)
    n_l, n_u = len(data.labeled_idx), len(data.unlabeled_idx)
    counter = {"step": 0}

    def view(raw, strong=False):
        x = augment.rand_augment(raw, num_ops=2, cutout_frac=0.5) if strong else augment.weak_augment(raw)
        return ((x - mean) / std).contiguous(memory_format=memory_format)

    def step():
        if uses_cuda_graphs(args):
            torch.compiler.cudagraph_mark_step_begin()
        li = data.labeled_idx[torch.randint(n_l, (b_l,), device=device)]
        raw_l, y = data.train_x[li].float() / 255, data.y_hidden[li]
        if not plugins:
            with autocast:
                loss = F.cross_entropy(net(view(raw_l)).float(), y)
        else:
            raw_u = data.train_x[data.unlabeled_idx[torch.randint(n_u, (b_u,), device=device)]].float() / 255
            loss = (mixmatch_loss if plugins == ["mixmatch"] else pi_loss)(raw_l, y, raw_u)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        counter["step"] += 1

    def pi_loss(raw_l, y, raw_u):
        x_l, x_u, x_u2 = view(raw_l), view(raw_u), view(raw_u, strong=True)
        with autocast:
            logits = net(torch.cat([x_l, x_u])).float()
            with frozen_bn(model):
                logits2 = net(x_u2).float()
        target = logits[b_l:].detach().softmax(-1)
        return F.cross_entropy(logits[:b_l], y) + 10 * (logits2.softmax(-1) - target).pow(2).mean()

    def mixmatch_loss(raw_l, y, raw_u):
        from ssltrain_plugins.mixmatch import guess_labels, interleave, mix_weights, mixup
        views = [view(raw_u) for _ in range(2)]
        with torch.no_grad(), autocast, frozen_bn(model):
            q = guess_labels([net(v).float().softmax(-1) for v in views], 0.5)
        x_all = torch.cat([view(raw_l), *views])
        p_all = torch.cat([F.one_hot(y, data.num_classes).float(), q, q])
        n = x_all.shape[0]
        x_mix, p_mix = mixup(x_all, p_all, mix_weights(n, 0.75, device), torch.randperm(n, device=device))
        chunks = interleave(list(x_mix.split(b_l)), b_l)
        with autocast:
            outs = [net(c) if i == 0 else _frozen(model, net, c) for i, c in enumerate(chunks)]
        logits = interleave(outs, b_l)
        lx = -(p_mix[:b_l] * logits[0].float().log_softmax(-1)).sum(-1).mean()
        lu = (torch.cat(logits[1:]).float().softmax(-1) - p_mix[b_l:]).pow(2).mean()
        return lx + 75 * min(counter["step"] / 16384, 1.0) * lu  # linear ramp of lambda_u, as the plugin

    model.train()
    with FlopCounterMode(display=False) as flop_counter:
        step()
    net = compile_model(model, args)
    clock = Clock(device)
    _reset_peak(device)
    for _ in range(args.warmup + args.steps):
        step()
        clock.mark()
    return clock.intervals()[args.warmup - 1:], _peak(device), flop_counter.get_total_flops()


def _frozen(model, net, x):
    with frozen_bn(model):
        return net(x)


def dispatch_seconds() -> float:
    """pluggy's own cost per hook call: a hook with one trivial implementation, called through
    pluggy against a direct call of the same function."""
    config = tiny_config(plugins=["pi_model"])
    trainer = Trainer(config, tempfile.mkdtemp(), discover())
    hook, impl = trainer.hook.ssl_unlabeled_weights, trainer.hook.ssl_unlabeled_weights.get_hookimpls()[0]
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        hook(outputs=None, batch=None, ctx=None)
    t1 = time.perf_counter()
    for _ in range(n):
        impl.function()
    t2 = time.perf_counter()
    return max(0.0, ((t1 - t0) - (t2 - t1)) / n)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # process high-water mark


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["supervised", "mixmatch", "small_cnn"])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="turns of (ssltrain, plain) per shape")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: the trainer's (on for images)")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, default=None,
                   help="compile the model (optionally with a torch.compile mode, e.g. reduce-overhead)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no inductor)")
    p.add_argument("--toy", action="store_true", help="tiny versions of the shapes (rehearsals)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--allocator", choices=["tcmalloc", "system"], default="tcmalloc")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if cpu and args.allocator == "tcmalloc" and "tcmalloc" not in os.environ.get("LD_PRELOAD", "") \
            and Path(TCMALLOC).exists():
        os.environ["LD_PRELOAD"] = f"{TCMALLOC} {os.environ.get('LD_PRELOAD', '')}".strip()
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system malloc"
    device = "cuda" if not cpu else "cpu"
    channels_last = "trainer default" if args.channels_last is None else args.channels_last
    print(f"device {device} ({torch.cuda.get_device_name() if not cpu else f'{torch.get_num_threads()} threads'}), "
          f"allocator {allocator}, torch {torch.__version__}, amp {args.amp}, channels_last {channels_last}, "
          f"compile {args.compile}, {args.steps} timed steps after {args.warmup} warm-up, {args.rounds} rounds")
    per_call = dispatch_seconds()
    results = []
    for shape in args.shape:
        ours, plain, calls, peaks = [], [], 0, []
        for _ in range(args.rounds):
            times, calls, peak = time_ssltrain(shape, args)
            ours += times
            times, peak_plain, flops = time_plain(shape, args)
            plain += times
            peaks.append((peak, peak_plain))
        t_ours, t_plain = statistics.median(ours), statistics.median(plain)
        _, _, image, b_l, b_u, plugins = shape_spec(shape, args)
        images = b_l + b_u * (2 if plugins else 0)
        row = {"shape": shape, "images_per_step": images, "ssltrain_step_s": t_ours, "plain_step_s": t_plain,
               "ratio": t_ours / t_plain, "ssltrain_steps_per_s": 1 / t_ours, "plain_steps_per_s": 1 / t_plain,
               "samples_per_s": images / t_ours, "hook_calls_per_step": calls,
               "dispatch_share": calls * per_call / t_ours, "peak_memory_mb": max(p[0] for p in peaks) / 2**20,
               "plain_peak_memory_mb": max(p[1] for p in peaks) / 2**20,
               "gflop_per_step": flops / 1e9, "ssltrain_gflop_per_s": flops / 1e9 / t_ours}
        results.append(row)
        print(f"{shape:10s} {images:4d} img/step  ssltrain {t_ours * 1000:8.1f} ms ({1 / t_ours:6.2f} steps/s, "
              f"{images / t_ours:7.0f} img/s)  plain {t_plain * 1000:8.1f} ms  ratio {t_ours / t_plain:.3f}  "
              f"hooks {calls}/step x {per_call * 1e6:.1f} us = {100 * row['dispatch_share']:.3f}% of the step  "
              f"peak mem {row['peak_memory_mb']:.0f} MB (plain {row['plain_peak_memory_mb']:.0f} MB)  "
              f"{row['gflop_per_step']:.1f} GFLOP/step = {row['ssltrain_gflop_per_s']:.1f} GFLOP/s", flush=True)
        if args.json:  # after every shape: a run stopped later keeps the shapes already timed
            Path(args.json).write_text(json.dumps({"args": vars(args), "allocator": allocator, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
