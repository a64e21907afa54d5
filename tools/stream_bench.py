"""Benchmark of the streamed input path (data.streaming): throughput, memory against dataset size, step time.

    python tools/stream_bench.py [--data /tmp/ssltrain_stream_bench] [--sizes 64 224] [--counts 2000 10000 50000]
                                 [--device cpu] [--workers 1] [--json out.json]
                                 [--only generate|throughput|memory|step ...]

It writes its image sets under --data first (generated JPEG shapes, tools/make_image_folder.py; about 2 GB and
10 minutes for the defaults; kept for the next run), then measures:

1. throughput: images decoded (torchvision, resized to the size) and delivered to the training process per
   second per worker: the training stream's DataLoader alone, `--workers` workers, no model.
2. memory: for each image size and each count of unlabeled images (file lists of the first N images of one
   pool; the labeled and test sets stay the same), a fresh process trains a streamed run (small CNN, Pi-model,
   `--memory-steps` steps, one evaluation) and reports its peak RSS (VmHWM), its workers' peak RSS and peak
   private memory, the peak PSS of the process tree (sampled every 0.1 s; shared pages counted once), the
   peak anonymous PSS of the tree (the memory the run allocates: without the shared libraries, whose PSS
   depends on how many other processes on the machine map them) and, on CUDA, peak device memory.
   Target: all of them within 10% from the smallest to the largest count (spread: largest / smallest - 1).
3. step: on CIFAR-sized data (32x32 JPEGs: 4,000 labeled, 46,000 unlabeled, 1,000 test) the training step of
   the same Pi-model run held on the device and streamed, in turns (resident, streamed, resident, streamed),
   median step times over `--steps` steps after warm-up; SmallCNN with 64 + 128 rows per step (a fast step,
   where decoding matters most) and WRN-28-2 with 16 + 32. Target: streamed / resident <= 1.1.

On the 2-core development machine run it through /work/bin/cpuslot with the default --threads 1 --workers 1
(the decoding worker then shares the second core with whatever else runs).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import Clock, StepClock  # noqa: E402
from make_image_folder import make_image_folder  # noqa: E402

from ssltrain.imagefiles import list_images  # noqa: E402
from ssltrain.loop import Trainer  # noqa: E402
from ssltrain.plugins import discover  # noqa: E402
from ssltrain.tiny import tiny_config  # noqa: E402

CIFAR = {"size": 32, "train": 400, "unlabeled": 46_000, "test": 100, "classes": 10}  # per class for train/test
MEMORY_COLUMNS = {"main_peak_rss_mib": "main peak RSS MiB", "worker_peak_rss_mib": "worker peak RSS MiB",
                  "worker_peak_private_mib": "worker peak private MiB", "tree_peak_pss_mib": "tree peak PSS MiB",
                  "tree_peak_pss_anon_mib": "tree peak anonymous PSS MiB"}
STEP_BATCHES = {"small_cnn": (64, 128), "wrn28_2": (16, 32)}  # labeled, unlabeled rows per step (Pi-model: 2 views)


# ----------------------------------------------------------------------------- data
def image_set(data: Path, size: int, unlabeled: int, train: int = 20, test: int = 50, classes: int = 4) -> Path:
    """The generated folder for `size` (JPEG only, every image size x size), made once."""
    root = data / f"shapes{size}_{unlabeled}"
    if not (root / "done").exists():
        print(f"generating {root} ...", flush=True)
        make_image_folder(root, train=train, unlabeled=unlabeled, test=test, size=size, classes=classes,
                          exact=True, png_share=0.0, per_folder=1000)
        (root / "done").write_text("")
    return root


def unlabeled_list(root: Path, count: int) -> Path:
    """A CSV file list of the first `count` unlabeled images of `root`."""
    path = root / f"unlabeled_{count}.csv"
    if not path.exists():
        paths = list_images(root / "unlabeled")[:count]
        assert len(paths) == count, f"{root} holds {len(paths)} unlabeled images, not {count}"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([["path"], *([p] for p in paths)])
    return path


def config(root: Path, size: int, args, *overrides: str, unlabeled: Path | None = None):
    options = f"{{unlabeled: {unlabeled}}}" if unlabeled else "{}"
    return tiny_config(["pi_model"], overrides=[
        "data.name=image_folder", f"data.root={root}", f"data.options={options}", f"data.image_size={size}",
        "data.num_labeled=null", f"data.stream.workers={args.workers}", "data.augment={flip: true, pad: 2}",
        f"train.cpu_threads={args.threads}", f"train.device={args.device}", "train.ema=0.999", "optim.lr=0.002",
        *overrides])


# ----------------------------------------------------------------------------- 1. throughput
def throughput(root: Path, size: int, args) -> dict:
    """Images per second per worker delivered by the training stream's DataLoader (no model)."""
    trainer = Trainer(config(root, size, args, "data.streaming=true", "data.batch_size=32",
                             "data.unlabeled_batch_size=224", "model.name=small_cnn", "model.options={width: 8}"),
                      tempfile.mkdtemp())
    source, rows_per_step = trainer.source, trainer.batch_l + trainer.batch_u
    source.rows(0)  # start the workers
    t0, steps = time.perf_counter(), max(2, args.throughput_images // rows_per_step)
    for step in range(1, steps + 1):
        source.rows(step)
    seconds = time.perf_counter() - t0
    return {"size": size, "workers": args.workers, "images_per_s": rows_per_step * steps / seconds,
            "images_per_s_per_worker": rows_per_step * steps / seconds / max(args.workers, 1)}


# ----------------------------------------------------------------------------- 2. memory
def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key)), 0)
    except OSError:  # the process ended
        return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


class MemorySampler(threading.Thread):
    """Samples the peak RSS and private memory of this process's children (the decoding workers) and the PSS
    (all, and anonymous only) of the whole tree."""

    def __init__(self):
        super().__init__(daemon=True)
        self.worker_peak_kib = self.worker_private_kib = self.tree_pss_kib = self.tree_pss_anon_kib = 0
        self.running = True

    def run(self):
        me = os.getpid()
        while self.running:
            kids = _children(me)
            self.worker_peak_kib = max([self.worker_peak_kib, *(_kib(f"/proc/{k}/status", "VmHWM") for k in kids)])
            self.worker_private_kib = max([self.worker_private_kib, *(_kib(f"/proc/{k}/smaps_rollup", "Private_Dirty:")
                                                                     for k in kids)])
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in [me, *kids])
            pss_anon = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss_Anon:") for p in [me, *kids])
            self.tree_pss_kib, self.tree_pss_anon_kib = max(self.tree_pss_kib, pss), max(self.tree_pss_anon_kib, pss_anon)
            time.sleep(0.1)


def memory_point(root: Path, size: int, count: int, args) -> dict:
    """One streamed run in this (fresh) process; its peak memory."""
    sampler = MemorySampler()
    sampler.start()
    steps = args.memory_steps
    cfg = config(root, size, args, "data.streaming=true", "data.batch_size=32", "data.unlabeled_batch_size=96",
                 "model.name=small_cnn", "model.options={width: 8}", f"train.steps={steps}",
                 f"train.eval_every={steps}", f"train.log_every={steps}", unlabeled=unlabeled_list(root, count))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, tempfile.mkdtemp())
    rows = trainer.data.files.num_train_rows + len(trainer.data.files.test)
    trainer.fit()
    sampler.running = False
    sampler.join()
    return {"size": size, "unlabeled": count, "images": rows,
            "decoded_mib": rows * 3 * size * size / 2**20,
            "main_peak_rss_mib": _kib("/proc/self/status", "VmHWM") / 1024,
            "worker_peak_rss_mib": sampler.worker_peak_kib / 1024,
            "worker_peak_private_mib": sampler.worker_private_kib / 1024, "tree_peak_pss_mib": sampler.tree_pss_kib / 1024,
            "tree_peak_pss_anon_mib": sampler.tree_pss_anon_kib / 1024,
            "device_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None}


# ----------------------------------------------------------------------------- 3. step time
def step_times(root: Path, streaming: str, model: str, args) -> list[float]:
    """Step times (s) of `--steps` steps after `--warmup`, the run held on the device or streamed."""
    total = args.warmup + args.steps
    labeled, unlabeled = STEP_BATCHES[model]
    cfg = config(root, 32, args, f"data.streaming={streaming}", f"data.batch_size={labeled}",
                 f"data.unlabeled_batch_size={unlabeled}",
                 f"model.name={model}", "model.options={}", f"train.steps={total}", f"train.eval_every={total}",
                 f"train.log_every={total}")
    cfg.plugins.append("clock")
    trainer = Trainer(cfg, tempfile.mkdtemp(), {**discover(), "clock": StepClock})
    clock = trainer.pm.get_plugin("clock").clock = Clock(trainer.device)
    clock.mark()
    trainer.fit()  # marks every step's end; the one evaluation comes after the last mark
    return clock.intervals()[args.warmup:]


def step_comparison(root: Path, model: str, args) -> dict:
    times = {"false": [], "true": []}
    for _ in range(args.rounds):
        for streaming in ("false", "true"):
            times[streaming] += step_times(root, streaming, model, args)
    resident, streamed = statistics.median(times["false"]), statistics.median(times["true"])
    return {"model": model, "resident_step_s": resident, "streamed_step_s": streamed, "ratio": streamed / resident}


# ----------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ssltrain_stream_bench")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--counts", type=int, nargs="+", default=[2000, 10_000, 50_000])
    p.add_argument("--models", nargs="+", default=["small_cnn", "wrn28_2"])
    p.add_argument("--only", nargs="+", default=["throughput", "memory", "step"],
                   choices=["generate", "throughput", "memory", "step"],
                   help="the parts to run (generate: only write the image sets)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=20)
    p.add_argument("--throughput-images", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cifar-unlabeled", type=int, default=CIFAR["unlabeled"])
    p.add_argument("--json", type=Path)
    p.add_argument("--memory-point", nargs=3, metavar=("ROOT", "SIZE", "COUNT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_point:  # a child process: one memory point, as JSON
        root, size, count = args.memory_point
        print("RESULT " + json.dumps(memory_point(Path(root), int(size), int(count), args)), flush=True)
        return 0
    args.data.mkdir(parents=True, exist_ok=True)
    results: dict[str, list] = {"throughput": [], "memory": [], "step": []}
    roots = {size: image_set(args.data, size, max(args.counts)) for size in args.sizes}
    if "throughput" in args.only:
        for size in args.sizes:
            results["throughput"].append(row := throughput(roots[size], size, args))
            print(f"throughput {size}x{size}: {row['images_per_s_per_worker']:,.0f} images/s per worker "
                  f"({args.workers} worker(s))", flush=True)
    if "memory" in args.only:
        for size in args.sizes:
            for count in args.counts:
                cmd = [sys.executable, __file__, "--memory-point", str(roots[size]), str(size), str(count),
                       "--device", args.device, "--workers", str(args.workers), "--threads", str(args.threads),
                       "--memory-steps", str(args.memory_steps)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode or not line:
                    sys.exit(f"memory point failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
                results["memory"].append(row := json.loads(line[0][7:]))
                print(f"memory {size}x{size} {count:>6} unlabeled: main {row['main_peak_rss_mib']:.0f} MiB, worker "
                      f"{row['worker_peak_rss_mib']:.0f} MiB ({row['worker_peak_private_mib']:.0f} private), tree PSS "
                      f"{row['tree_peak_pss_mib']:.0f} MiB ({row['tree_peak_pss_anon_mib']:.0f} anonymous) "
                      f"(decoded set {row['decoded_mib']:,.0f} MiB)", flush=True)
    if {"generate", "step"} & set(args.only):
        cifar = image_set(args.data, CIFAR["size"], args.cifar_unlabeled, CIFAR["train"], CIFAR["test"],
                          CIFAR["classes"])
    if "step" in args.only:
        for model in args.models:
            results["step"].append(row := step_comparison(cifar, model, args))
            print(f"step {model}: resident {row['resident_step_s'] * 1e3:.1f} ms, streamed "
                  f"{row['streamed_step_s'] * 1e3:.1f} ms, ratio {row['ratio']:.3f}", flush=True)
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_tables(results: dict) -> None:
    if results["memory"]:
        print("\n| size | unlabeled | decoded set MiB | " + " | ".join(MEMORY_COLUMNS.values())
              + " | device peak MiB |\n|---|---|---|" + "---|" * (len(MEMORY_COLUMNS) + 1))
        for r in results["memory"]:
            device = "n/a (CPU)" if r["device_peak_mib"] is None else f"{r['device_peak_mib']:.0f}"
            print(f"| {r['size']} | {r['unlabeled']:,} | {r['decoded_mib']:,.0f} | "
                  + " | ".join(f"{r[key]:.0f}" for key in MEMORY_COLUMNS) + f" | {device} |")
        print("\nspread over the counts (largest / smallest - 1; target <= 10%):\n\n| size | "
              + " | ".join(MEMORY_COLUMNS.values()) + " |\n|---|" + "---|" * len(MEMORY_COLUMNS))
        for size in sorted({r["size"] for r in results["memory"]}):
            rows = [r for r in results["memory"] if r["size"] == size]
            spreads = [max(r[key] for r in rows) / min(r[key] for r in rows) - 1 for key in MEMORY_COLUMNS]
            print(f"| {size} | " + " | ".join(f"{s:.1%}" for s in spreads) + " |")
    for r in results["throughput"]:
        print(f"throughput {r['size']}x{r['size']}: {r['images_per_s_per_worker']:,.0f} images/s per worker")
    for r in results["step"]:
        print(f"step {r['model']}: streamed / resident = {r['ratio']:.3f} ({r['streamed_step_s'] * 1e3:.1f} ms / "
              f"{r['resident_step_s'] * 1e3:.1f} ms)")


if __name__ == "__main__":
    sys.exit(main())
