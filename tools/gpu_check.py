"""The whole GPU check in one command: environment, the CUDA tests, throughput against the targets, and
the leaderboard at a GPU budget.

    python tools/gpu_check.py --out DIR [--budget-s 500] [--dry-run] [--parts environment cuda_tests ...]
        [--leaderboard-configs 'configs/leaderboard/*.yaml'] [--leaderboard-steps 20000] [--data-root DIR]

Parts (each runnable alone with --parts, in this order):
  environment  GPU, driver, CUDA, torch, clocks, packages, the dataset found, a bf16 matmul rate
  cuda_tests   `pytest -m cuda`: pass/fail per test
  throughput   tools/bench.py on the shapes supervised, mixmatch, heavy and small_cnn_mixmatch: eager,
               compile and compile's reduce-overhead mode (CUDA graphs), bf16 and fp32, channels_last
               or not, against the targets (steps/s on one H100/H200)
  leaderboard  tools/benchmark.py on every config of --leaderboard-configs at 250 and 40 labels, 3 seeds,
               --leaderboard-steps steps, as N concurrent processes on the one GPU (N measured first);
               what does not fit its time is cut by the rule printed in the report
Every part gets a share of --budget-s (time a part leaves unused goes to the next ones), runs its work in
subprocesses with time limits, and writes its results as soon as it has them: a part that fails or runs
out of time loses nothing that came before it. At most 8 files go into --out: report.md, environment.csv,
cuda_tests.csv, throughput.csv, concurrency.csv, leaderboard.md, leaderboard.csv (tools/benchmark.py's
tables) and log.txt (every subprocess's output). --dry-run runs every part on the CPU at toy size in about
two minutes, with the same report layout (tests/test_gpu_check.py runs it on every change).

This file imports only torch and the standard library at the top: it reports a broken environment (say,
pydantic missing) instead of failing to start.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["environment", "cuda_tests", "throughput", "leaderboard"]
SHARES = {"environment": 0.03, "cuda_tests": 0.25, "throughput": 0.32, "leaderboard": 0.40}  # of the budget
DRY_SHARES = {"environment": 0.02, "cuda_tests": 0.3, "throughput": 0.25, "leaderboard": 0.43}
TARGETS = {"heavy": 40.0, "mixmatch": 100.0, "small_cnn_mixmatch": 500.0}  # ssltrain steps/s on one H100/H200 (issue 17)
SHAPES = ["small_cnn_mixmatch", "mixmatch", "heavy", "supervised"]
VARIANTS = [  # (name, tools/bench.py arguments, shapes): in priority order, as the part's time allows
    ("eager bf16 channels_last", ["--amp", "bf16", "--channels-last"], SHAPES),
    ("reduce-overhead bf16 channels_last", ["--amp", "bf16", "--channels-last", "--compile", "reduce-overhead"],
     ["small_cnn_mixmatch", "mixmatch", "heavy"]),
    ("compile bf16 channels_last", ["--amp", "bf16", "--channels-last", "--compile"], ["mixmatch", "heavy", "small_cnn_mixmatch", "supervised"]),
    ("eager fp32 channels_last", ["--amp", "none", "--channels-last"], SHAPES),
    ("eager bf16 contiguous", ["--amp", "bf16", "--no-channels-last"], SHAPES),
]
TRAINING_NEEDS = ["pydantic", "matplotlib"]  # ssltrain's config, and the figures its evaluations draw
PACKAGES = ["ssltrain", "torch", "torchvision", "triton", "pydantic", "pydantic-core", "matplotlib", "pluggy",
            "PyYAML", "tensorboard", "tqdm", "scipy", "numpy", "pytest", "setuptools"]
LABELS, SEEDS, MIN_STEPS = [250, 40], [0, 1, 2], 5000
SAFETY = 1.2  # the estimate's allowance for evaluations, checkpoints and uneven cells
CUT_RULE = (f"Cut rule, applied in this order until the estimate fits the part's time: 1) fewer seeds (3, then 2, "
            f"then 1); 2) fewer label counts (40 dropped, 250 kept); 3) fewer steps (halved, not below {MIN_STEPS}). "
            f"Whatever still does not fit runs seed by seed until the time limit; unfinished cells are listed as not "
            f"run (they resume from their checkpoints when the same command runs again on the same machine). "
            f"Estimate: ceil(cells / N) x (steps / per-process steps/s + overhead per cell) x {SAFETY}; the overhead is "
            f"a probe process's wall time minus its training time (start-up, evaluation, checkpoint).")
FILES = ["report.md", "environment.csv", "cuda_tests.csv", "throughput.csv", "concurrency.csv", "leaderboard.md",
         "leaderboard.csv", "log.txt"]


@dataclass
class Part:
    name: str
    status: str = "not run"
    limit: float = 0.0
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)  # the report section's body (Markdown)


class TimeUp(Exception):
    """A part reached its time limit; what it wrote so far stays."""


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r)) or ["none"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], keys: list[str] | None = None) -> list[str]:
    keys = keys or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]


def fmt(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


class Check:
    """One run of the check: the output folder, the log, the budget, and the parts' results."""

    def __init__(self, args, argv: list[str]):
        self.args, self.argv, self.dry = args, argv, args.dry_run
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if self.dry else ROOT / ".gpu" / "work"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.parts = {name: Part(name) for name in args.parts}
        self.log_file = open(self.out / "log.txt", "a", buffering=1)
        self.dataset: tuple[str, list[str]] | None = None

    # --- running things -----------------------------------------------------------------------------

    def log(self, message: str) -> None:
        line = f"[gpu_check {time.monotonic() - self.started:6.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def run(self, argv: list[str], seconds: float, env: dict | None = None, grace: float = 3) -> tuple[int | None, bool]:
        """Run argv (output into log.txt) for at most `seconds`: (exit code, timed out). At the limit the
        process group gets SIGTERM (ssltrain runs write a checkpoint), then SIGKILL `grace` seconds later."""
        self.log(f"$ {shlex.join(argv)}  (limit {seconds:.0f} s)")
        if seconds < 1:
            return None, True
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        try:
            return proc.wait(timeout=seconds), False
        except subprocess.TimeoutExpired:
            self.log(f"time limit reached after {seconds:.0f} s: stopping {argv[1:3]}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return proc.returncode, True

    def left(self, part_deadline: float) -> float:
        return part_deadline - time.monotonic()

    def limit_for(self, name: str) -> float:
        """This part's share of the time left, against the shares of the parts still to run."""
        share = DRY_SHARES if self.dry else SHARES
        todo = PARTS[PARTS.index(name):]
        return max(0.0, (self.deadline - time.monotonic() - 3) * share[name] / sum(share[p] for p in todo if p in self.parts))

    def main(self) -> int:
        self.log(f"{'dry run on the CPU' if self.dry else 'GPU check'}: parts {list(self.parts)}, budget "
                 f"{self.args.budget_s:.0f} s, out {self.out}, work {self.work}")
        self.write_report()
        for name, part in self.parts.items():
            part.limit = self.limit_for(name)
            part.status = "running"
            self.write_report()
            t0 = time.monotonic()
            self.log(f"part {name}: limit {part.limit:.0f} s")
            try:
                getattr(self, name)(part, t0 + part.limit)
                if part.status == "running":
                    part.status = "done"
            except TimeUp as exc:
                part.status = f"time limit: {exc}"
            except Exception as exc:  # a broken part must not take the others with it
                part.status = f"failed: {type(exc).__name__}: {exc}"
                self.log_file.write(traceback.format_exc())
            part.seconds = time.monotonic() - t0
            self.log(f"part {name}: {part.status} ({part.seconds:.0f} s)")
            self.write_report()
        print("\n" + (self.out / "report.md").read_text(), flush=True)
        return 0 if all(p.status.startswith("done") for p in self.parts.values()) else 1

    # --- the report ---------------------------------------------------------------------------------

    def write_report(self) -> None:
        title = "GPU check (dry run on the CPU, toy sizes)" if self.dry else "GPU check"
        lines = [f"# {title}", "", f"Command: `{shlex.join(['python', 'tools/gpu_check.py', *self.argv])}`  ",
                 f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}, {time.monotonic() - self.started:.0f} s after the "
                 f"start; budget {self.args.budget_s:.0f} s.", "",
                 *markdown_table([{"part": p.name, "status": p.status, "seconds": f"{p.seconds:.0f}",
                                   "limit s": f"{p.limit:.0f}"} for p in self.parts.values()]), ""]
        for i, name in enumerate(PARTS, 1):
            if name in self.parts:
                part = self.parts[name]
                lines += [f"## {i}. {name}", "", f"Status: {part.status}", "", *part.lines, ""]
        tmp = self.out / ".report.md.tmp"
        tmp.write_text("\n".join(lines))
        os.replace(tmp, self.out / "report.md")

    def log_tail(self, n: int = 8) -> list[str]:
        """The last lines of log.txt, for a failure's report."""
        self.log_file.flush()
        tail = (self.out / "log.txt").read_text(errors="replace").splitlines()[-n:]
        return ["```", *tail, "```"]

    def needs_training(self) -> None:
        """Fail a part that trains at once, with the reason, when a module every training imports is missing
        (instead of spending the part's time on runs that all fail the same way)."""
        missing = [m for m in TRAINING_NEEDS if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(f"every training here needs {' and '.join(missing)}, missing on this machine: install "
                               f"the carried wheels (README, 'Air-gapped GPU nodes'; tools/gpu_run.sh does)")

    # --- 1. environment -----------------------------------------------------------------------------

    def environment(self, part: Part, deadline: float) -> None:
        rows = {"python": sys.version.split()[0], "torch": torch.__version__, "torch CUDA": torch.version.cuda,
                "cuDNN": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                "CUDA available": torch.cuda.is_available(), "CPU cores": os.cpu_count()}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            rows.update({"GPU": props.name, "GPUs": torch.cuda.device_count(),
                         "compute capability": f"{props.major}.{props.minor}",
                         "GPU memory GiB": round(props.total_memory / 2**30, 1),
                         "multiprocessors": props.multi_processor_count})
        rows.update(nvidia_smi())
        for name in PACKAGES:
            try:
                rows[f"package {name}"] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                rows[f"package {name}"] = "MISSING"
        try:
            import ssltrain  # noqa: F401  (needs pydantic: the carried wheels)
            rows["ssltrain importable"] = "yes"
        except Exception as exc:
            rows["ssltrain importable"] = f"NO: {type(exc).__name__}: {exc}"
        rows["git commit"] = git_commit()
        try:
            description, overrides = self.find_dataset()
            rows["leaderboard dataset"] = description
        except Exception as exc:
            rows["leaderboard dataset"] = f"not determined: {exc}"
        if torch.cuda.is_available():
            rows["bf16 matmul TFLOP/s (8192^3, mean of 10)"] = round(bf16_tflops(), 1)
        write_csv(self.out / "environment.csv", [{"key": k, "value": v} for k, v in rows.items()])
        part.lines = markdown_table([{"key": k, "value": v} for k, v in rows.items()])
        missing = [k for k, v in rows.items() if v == "MISSING" and k != "package ssltrain"]
        if missing or rows["ssltrain importable"] != "yes":
            part.status = f"done (missing: {', '.join(m.split()[-1] for m in missing) or 'ssltrain'})"

    def find_dataset(self) -> tuple[str, list[str]]:
        """The leaderboard's data: Fashion-MNIST's IDX files (the carried folder first), else CIFAR-10, else
        synthetic images of Fashion-MNIST's shape; (what was found, the --set overrides that use it)."""
        if self.dataset is None:
            from ssltrain.datasets import _find_fashion_mnist
            roots = [self.args.data_root] if self.args.data_root else []
            roots += [str(ROOT / ".gpu" / "fashion-mnist"), "/usr/share/datasets/fashion-mnist", str(ROOT / "data")]
            found = next((r for r in roots if Path(r).is_dir() and _find_fashion_mnist(r)), None)
            cifar = next((r for r in [str(ROOT / "data"), str(ROOT / ".gpu" / "cifar10")]
                          if (Path(r) / "cifar-10-batches-py").is_dir()), None)
            if found:
                self.dataset = (f"Fashion-MNIST from {found}", ["data.name=fashion_mnist", f"data.root={found}"])
            elif cifar:
                self.dataset = (f"FALLBACK: Fashion-MNIST not found in {roots}; CIFAR-10 from {cifar}",
                                ["data.name=cifar10", f"data.root={cifar}"])
            else:
                self.dataset = (f"FALLBACK: no Fashion-MNIST in {roots} and no CIFAR-10: synthetic 28x28 images "
                                f"(timings only; accuracies mean nothing)",
                                ["data.name=synthetic", "data.options={n_train: 60000, n_test: 10000, shape: [1, 28, 28]}"])
        return self.dataset

    # --- 2. the CUDA tests --------------------------------------------------------------------------

    def cuda_tests(self, part: Part, deadline: float) -> None:
        results = self.work / "cuda_tests.jsonl"
        results.unlink(missing_ok=True)
        env = {"SSLTRAIN_TEST_RESULTS": str(results), **({"SSLTRAIN_CUDA_TEST_DEVICE": "cpu"} if self.dry else {})}
        rc, timed_out = self.run([sys.executable, "-m", "pytest", "-m", "cuda", "-o", "addopts=", "-q", "-rfEs",
                                  "-p", "no:cacheprovider", "tests"], self.left(deadline), env)
        collected, outcomes = [], {}
        rank = {"passed": 0, "skipped": 1, "failed": 2}
        for line in results.read_text().splitlines() if results.exists() else []:
            entry = json.loads(line)
            if "collected" in entry:
                collected = entry["collected"]
                continue
            old = outcomes.get(entry["test"])
            if old is None or rank[entry["outcome"]] > rank[old["outcome"]]:
                entry["seconds"] += old["seconds"] if old else 0.0
                outcomes[entry["test"]] = entry
        rows = []
        for test in collected or list(outcomes):
            entry = outcomes.get(test)
            rows.append({"test": test.split("::", 1)[-1], "outcome": entry["outcome"] if entry else
                         ("not run (time limit)" if timed_out else "not run"),
                         "seconds": fmt(entry["seconds"], 2) if entry else "", "message": entry["message"] if entry else ""})
        write_csv(self.out / "cuda_tests.csv", rows)
        counts = {k: sum(r["outcome"].startswith(k) for r in rows) for k in ("passed", "failed", "skipped", "not run")}
        where = "the CPU (SSLTRAIN_CUDA_TEST_DEVICE=cpu, gloo for nccl, aot_eager for inductor)" if self.dry else "the GPU"
        part.lines = [f"`pytest -m cuda` on {where}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) +
                      f" (pytest exit code {rc}).", "", *markdown_table(rows, ["test", "outcome", "seconds", "message"])]
        if not rows:
            part.lines += ["", "No test results: the end of log.txt says why.", *self.log_tail()]
            raise RuntimeError(f"pytest gave no results (exit code {rc})")
        if counts["not run"]:
            raise TimeUp(f"{counts['not run']} tests not run")
        part.status = "done" if not counts["failed"] else f"done ({counts['failed']} failed)"

    # --- 3. throughput ------------------------------------------------------------------------------

    def throughput(self, part: Part, deadline: float) -> None:
        self.needs_training()
        rows: list[dict] = []
        scale = (["--device", "cpu", "--toy", "--steps", "2", "--warmup", "1", "--rounds", "1", "--threads", "1",
                  "--compile-backend", "aot_eager"] if self.dry else ["--device", "cuda", "--steps", "40", "--warmup", "10"])
        part.lines = self.throughput_lines(rows)
        for variant, options, shapes in VARIANTS:
            compiled = "--compile" in options
            if self.dry and variant != VARIANTS[0][0]:
                if variant != VARIANTS[1][0]:  # the first two variants rehearse the eager and the compiled paths
                    rows += [throughput_row(shape, variant, "skipped (dry run)", None, rows) for shape in shapes]
                    write_csv(self.out / "throughput.csv", rows)
                    part.lines = self.throughput_lines(rows)
                    continue
                shapes = ["small_cnn_mixmatch"]
            result = self.work / f"bench-{variant.replace(' ', '_')}.json"
            result.unlink(missing_ok=True)
            rounds = ["--rounds", "1"] if compiled and not self.dry else []
            rc, timed_out = self.run([sys.executable, "tools/bench.py", "--shape", *shapes, *scale, *rounds, *options,
                                      "--json", str(result)], self.left(deadline))
            timed = {r["shape"]: r for r in (json.loads(result.read_text())["results"] if result.exists() else [])}
            for shape in shapes:
                status = "ok" if shape in timed else ("not run (time limit)" if timed_out else f"failed (exit {rc})")
                rows.append(throughput_row(shape, variant, status, timed.get(shape), rows))
            write_csv(self.out / "throughput.csv", rows)
            part.lines = self.throughput_lines(rows)
            self.write_report()
        if any(r["status"].startswith("not run") for r in rows):
            raise TimeUp("rows marked 'not run' did not fit")
        failed = sum(r["status"].startswith("failed") for r in rows)
        part.status = "done" if not failed else f"done ({failed} rows failed: see log.txt)"

    def throughput_lines(self, rows: list[dict]) -> list[str]:
        note = ("Toy shapes on the CPU (tools/bench.py --toy; compile with the aot_eager backend on one shape; the "
                "other variants skipped): the layout of the GPU table, not its numbers. " if self.dry else "")
        return [f"{note}tools/bench.py: the ssltrain step against a plain PyTorch loop doing the same math, in "
                f"turns in one process; medians. ratio = ssltrain step time / plain step time; vs eager = steps/s "
                f"against the eager bf16 channels_last row of the shape; targets (steps/s, one H100/H200): "
                + ", ".join(f"{k} >= {v:.0f}" for k, v in TARGETS.items()) + ". Peak memory: CUDA's allocator "
                "high-water mark (process RSS on the CPU).", "",
                *markdown_table(rows, ["shape", "variant", "status", "steps_per_s", "images_per_s", "plain_steps_per_s",
                                       "ratio", "vs_eager", "peak_mb", "target", "meets_target"])]

    # --- 4. leaderboard -----------------------------------------------------------------------------

    def leaderboard(self, part: Part, deadline: float) -> None:
        configs = sorted(glob.glob(self.args.leaderboard_configs))
        if not configs:
            part.lines = [f"No configs match {self.args.leaderboard_configs!r}."]
            part.status = "skipped (no leaderboard configs)"
            return
        self.needs_training()
        benchmark = load_tool("benchmark")  # imports ssltrain: fails here, with the reason, if it cannot
        names = {(benchmark.load_yaml(c).get("data") or {}).get("name") for c in configs}
        if names == {"fashion_mnist"}:
            description, data_sets = self.find_dataset()
        else:
            description, data_sets = f"as in the configs (data.name {sorted(map(str, names))})", []
        steps = 4 if self.dry else self.args.leaderboard_steps
        common = [*data_sets, f"train.cpu_threads={1 if self.dry else 2}", "train.progress=lines"]
        part.lines = [f"Configs: {', '.join(configs)}.  ", f"Data: {description}.  ",
                      f"Steps: {steps}{' (dry run: 1 seed)' if self.dry else ''}, labels {LABELS}, seeds "
                      f"{SEEDS[:1] if self.dry else SEEDS}, before the cut rule.", ""]

        probe = self.probe_concurrency(configs, common, deadline)
        best = max((r for r in probe if r["aggregate_steps_per_s"]), key=lambda r: r["aggregate_steps_per_s"], default=None)
        part.lines += ["Concurrency (N processes of the leaderboard configs at once, "
                       f"{probe[0]['steps'] if probe else 0} steps each; per-process rate = steps / training seconds, without evaluation; overhead = wall time - training time):",
                       "", *markdown_table(probe), ""]
        if best is None:
            part.lines += ["No probe run finished: the end of log.txt says why.", *self.log_tail()]
            if any("time limit" in r["finished"] for r in probe):
                raise TimeUp("the concurrency probe did not finish in its time")
            raise RuntimeError("the concurrency probe failed")
        jobs, rate, overhead = best["processes"], best["per_process_steps_per_s"], best["overhead_s"]

        def pending_cells(labels, seeds, n_steps):
            cells = benchmark.build_cells(configs, labels, seeds, [f"train.steps={n_steps}", *common], benchmark.discover())
            return cells, [c for c in cells if not (c.run_dir(self.runs) / "summary.json").exists()]

        grace = 3 if self.dry else 30  # at the limit, for the running cells' checkpoints and the tables
        seconds = self.left(deadline) - grace - (2 if self.dry else 10)
        labels, seeds, n_steps, lines = plan_matrix(
            lambda la, se, st: len(pending_cells(la, se, st)[1]), LABELS, SEEDS[:1] if self.dry else SEEDS, steps,
            rate, overhead, jobs, seconds, min_steps=min(MIN_STEPS, steps))
        cells, _ = pending_cells(labels, seeds, n_steps)
        part.lines += [CUT_RULE, "", *lines, ""]
        self.write_report()
        argv = [sys.executable, "tools/benchmark.py", *configs, "--labels", *map(str, labels), "--seeds", *map(str, seeds),
                "--set", f"train.steps={n_steps}", *(a for s in common for a in ("--set", s)), "--jobs", str(jobs),
                "--name", "leaderboard", "--out", str(self.runs), "--runs", str(self.runs)]
        rc, timed_out = self.run(argv, self.left(deadline) - grace, grace=grace)
        for name in ("leaderboard.md", "leaderboard.csv"):  # the tables only: at most 8 files go into --out
            if (self.runs / name).exists():
                shutil.copyfile(self.runs / name, self.out / name)
        unfinished = [c.run_dir(self.runs).name for c in cells if not (c.run_dir(self.runs) / "summary.json").exists()]
        table = self.out / "leaderboard.md"
        means = table.read_text().split("## Mean over seeds")[-1].split("## Every run")[0].strip() if table.exists() else ""
        part.lines += [f"Mean over seeds (tools/benchmark.py; every run in leaderboard.md and leaderboard.csv; "
                       f"{len(cells) - len(unfinished)} of {len(cells)} cells finished):", "", means or "(no cell finished)", ""]
        if unfinished:
            part.lines += ["Not run or not finished (resumable):", "", *(f"- {name}" for name in unfinished)]
        if timed_out:
            raise TimeUp(f"{len(unfinished)} of {len(cells)} cells unfinished")
        if rc != 0:
            part.lines += ["", *self.log_tail()]
            part.status = f"done (tools/benchmark.py exit code {rc}: failed cells show as 'failed')"

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    def probe_concurrency(self, configs: list[str], common: list[str], deadline: float) -> list[dict]:
        """Train N copies (the configs in turn) at once for N = 1, 2, 4, 8 (1, 2 in a dry run); stops when
        more processes stop paying. Written to concurrency.csv as each N finishes."""
        steps = 4 if self.dry else self.args.probe_steps
        rows: list[dict] = []
        for n in ([1, 2] if self.dry else [1, 2, 4, 8]):
            limit = min(self.left(deadline) * (0.25 if rows else 0.4), 120)  # N = 1 is the one the plan needs
            folder = self.work / f"probe-{n}"
            started = time.monotonic()
            procs = []
            for i in range(n):
                out = folder / str(i)
                shutil.rmtree(out, ignore_errors=True)
                argv = [sys.executable, "-m", "ssltrain", "train", configs[i % len(configs)],
                        *(a for s in [*common, f"train.steps={steps}", f"train.eval_every={steps}", f"data.num_labeled={min(LABELS)}"]
                          for a in ("--set", s)), "--out", str(out)]
                procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            self.log(f"probe: {n} processes x {steps} steps (limit {limit:.0f} s)")
            timed_out = False
            for proc in procs:
                try:
                    proc.wait(timeout=max(1.0, started + limit - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            wall = time.monotonic() - started
            summaries = [json.loads(p.read_text()) for p in folder.glob("*/summary.json")]
            rates = [s["steps"] / max(s["train_seconds"], 1e-9) for s in summaries]
            ok = len(summaries) == n
            rows.append({"processes": n, "finished": f"{len(summaries)}/{n}" + (" (time limit)" if timed_out else ""),
                         "steps": steps,
                         "per_process_steps_per_s": round(sum(rates) / len(rates), 1) if ok else None,
                         "aggregate_steps_per_s": round(sum(rates), 1) if ok else None,
                         "overhead_s": round(wall - min(s["train_seconds"] for s in summaries), 1) if ok else None,
                         "wall_s": round(wall, 1)})
            write_csv(self.out / "concurrency.csv", rows)
            best = max((r["aggregate_steps_per_s"] for r in rows[:-1] if r["aggregate_steps_per_s"]), default=0)
            if not ok or rows[-1]["aggregate_steps_per_s"] < 1.05 * best:
                break  # more processes no longer pay (or this count failed)
        return rows


def plan_matrix(count_cells, labels: list[int], seeds: list[int], steps: int, rate: float, overhead: float,
                jobs: int, seconds: float, min_steps: int) -> tuple[list[int], list[int], int, list[str]]:
    """The largest matrix that fits `seconds` under CUT_RULE: (labels, seeds, steps, report lines).
    count_cells(labels, seeds, steps) counts the cells still to train (finished ones cost nothing)."""
    def estimate(la, se, st):
        return math.ceil(count_cells(la, se, st) / jobs) * (st / rate + overhead) * SAFETY

    candidates = [(labels, seeds[:k], steps) for k in range(len(seeds), 0, -1)]
    candidates += [(labels[:k], seeds[:1], steps) for k in range(len(labels) - 1, 0, -1)]
    st = steps
    while st // 2 >= min_steps:
        st //= 2
        candidates.append((labels[:1], seeds[:1], st))
    lines = [f"Measured: {rate:.1f} steps/s per process with N = {jobs} processes, {overhead:.0f} s overhead per cell; "
             f"{seconds:.0f} s left for training."]
    for la, se, st in candidates:
        need = estimate(la, se, st)
        lines.append(f"- labels {la}, seeds {se}, {st} steps: {count_cells(la, se, st)} cells to train, about "
                     f"{need:.0f} s: {'fits' if need <= seconds else 'does not fit'}")
        if need <= seconds:
            break
    if need > seconds:
        lines.append(f"Nothing fits: running labels {la}, seeds {se}, {st} steps until the time limit.")
    cut = [f"{len(seeds) - len(se)} seed(s)" if len(se) < len(seeds) else "",
           f"labels {[n for n in labels if n not in la]}" if len(la) < len(labels) else "",
           f"steps {steps} -> {st}" if st < steps else ""]
    cut = [c for c in cut if c]
    lines.append(f"Plan: labels {la}, seeds {se}, {st} steps, {jobs} processes at once; "
                 + (f"CUT: {', '.join(cut)}." if cut else "nothing cut."))
    return la, se, st, lines


def throughput_row(shape: str, variant: str, status: str, r: dict | None, earlier: list[dict]) -> dict:
    """One row of the throughput table from tools/bench.py's JSON result (None when it did not run)."""
    target = TARGETS.get(shape)
    row = {"shape": shape, "variant": variant, "status": status, "images_per_step": "", "steps_per_s": "",
           "images_per_s": "", "plain_steps_per_s": "", "ratio": "", "vs_eager": "", "peak_mb": "",
           "plain_peak_mb": "", "dispatch_share": "", "gflop_per_s": "",
           "target": fmt(target, 0), "meets_target": ""}
    if r is None:
        return row
    eager = next((e for e in earlier if e["shape"] == shape and e["variant"] == VARIANTS[0][0] and e["steps_per_s"]), None)
    speed = r["ssltrain_steps_per_s"]
    row.update(images_per_step=r["images_per_step"], steps_per_s=fmt(speed, 2), images_per_s=fmt(r["samples_per_s"], 0),
               plain_steps_per_s=fmt(r["plain_steps_per_s"], 2), ratio=fmt(r["ratio"], 3),
               vs_eager=fmt(speed / float(eager["steps_per_s"]), 2) if eager else ("1.00" if variant == VARIANTS[0][0] else ""),
               peak_mb=fmt(r["peak_memory_mb"], 0), plain_peak_mb=fmt(r["plain_peak_memory_mb"], 0),
               dispatch_share=f"{100 * r['dispatch_share']:.3f}%", gflop_per_s=fmt(r["ssltrain_gflop_per_s"], 0),
               meets_target="" if target is None else ("yes" if speed >= target else "NO"))
    return row


def nvidia_smi() -> dict:
    """Driver, clocks, power and temperature from nvidia-smi (empty where it is missing)."""
    fields = ["driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.draw",
              "power.limit", "temperature.gpu", "memory.used", "memory.total"]
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"nvidia-smi": f"not available ({type(exc).__name__})"}
    if out.returncode != 0:
        return {"nvidia-smi": f"exit code {out.returncode}: {out.stderr.strip()[:200]}"}
    values = [v.strip() for v in out.stdout.splitlines()[0].split(",")]
    return {f"nvidia-smi {k}": v for k, v in zip(fields, values)}


def bf16_tflops(n: int = 8192, repeats: int = 10) -> float:
    """A bf16 matrix product's rate on random data (ceiling of the matrix units, for context)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1000) / 1e12


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown (no git repository)"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"


def load_tool(name: str):
    """A module of tools/ (e.g. benchmark) by file path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"ssltrain_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder of the report (at most 8 files)")
    p.add_argument("--budget-s", type=float, default=None, help="the whole check's time (default 500; dry run 170)")
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU at toy size")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    p.add_argument("--leaderboard-configs", default=str(ROOT / "configs" / "leaderboard" / "*.yaml"),
                   help="glob of the leaderboard's configs")
    p.add_argument("--leaderboard-steps", type=int, default=20000)
    p.add_argument("--probe-steps", type=int, default=600, help="steps of each concurrency-probe run")
    p.add_argument("--data-root", help="folder of Fashion-MNIST's IDX files (default: .gpu/fashion-mnist, then Debian's)")
    p.add_argument("--work", help="runs, probes and partial results (default .gpu/work; a temporary folder in a dry run)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 170.0 if args.dry_run else 500.0
    args.parts = [name for name in PARTS if name in args.parts]
    return Check(args, argv).main()


if __name__ == "__main__":
    sys.exit(main())
