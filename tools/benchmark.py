"""Benchmark matrix: configs x label counts x seeds, always with the supervised baseline.

    python tools/benchmark.py configs/mixmatch_fashion_mnist.yaml --labels 40 250 1000 --seeds 0 1 \
        [--seeds-at 40=0,1] [--set train.steps=3000 ...] [--name fashion_mnist] [--out results]
        [--runs runs/benchmark] [--jobs N [--launcher CMD]]

Every config is run at every label count (`data.num_labeled`) and seed (`seed`: the labeled split
and the initialisation); `--seeds-at 40=0,1` runs label count 40 at seeds 0 and 1 instead. For each config the supervised baseline is the same config with
`plugins=[]`: same model, augmentation, optimizer, EMA and steps. Each cell trains in its own run
directory, named by a hash of its resolved config; a cell with a summary.json is not re-run and an
interrupted one resumes from its checkpoint, so re-running the command continues the matrix.
The hash covers defaults too: a new option in a plugin's Config (even one that keeps the old
behaviour) gives that plugin's cells new names, and they are re-run.
Configs whose baselines differ (other model, data or budget) each get their own, named
"supervised (<config file>)", and every method is compared with its own. Writes `<out>/<name>.md` and
`<out>/<name>.csv` (every cell, plus mean ± std over seeds) with the command that reproduces them, and
`<out>/<name>.png`: test accuracy against the number of labels, one line per method (mean ± std over seeds).

Sizing a matrix before running it:

    python tools/benchmark.py configs/leaderboard/*.yaml --labels 40 250 --seeds 0 1 2 --cost 40 --cost-rounds 3

trains every method (and the baseline) for 40 steps, `--cost-rounds` times in turns (so that a busy machine
slows every method alike), and writes `<out>/<name>_cost.md`: seconds per training step and per evaluation
(medians over the rounds), each method's cost relative to the baseline (and to FixMatch when present), and
the projected CPU time of the whole matrix at the configs' `train.steps` and `train.eval_every`.

`--jobs N` trains N cells at a time, each as its own `ssltrain train` process (its output in the
cell's `train.log`): small models leave a GPU mostly idle, and several processes fill it. Cells then
start seed by seed (every method's seed 0 first, in the order of `--labels`), so a matrix stopped early
holds whole comparisons at fewer seeds. `--launcher CMD` puts CMD before each cell's process, e.g. a
wrapper that waits for a free CPU slot. SIGINT/SIGTERM stop the matrix: running cells write a
checkpoint, and the same command resumes them.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from ssltrain.config import CORE_KEYS, RunConfig, apply_overrides, load_yaml, resolve
from ssltrain.errors import Interrupted, SSLTrainError
from ssltrain.loop import Trainer, train
from ssltrain.plugins import discover, schemas

COLUMNS = ["dataset", "labels", "method", "seed", "steps", "u_ratio", "test_top1", "median_last_test_top1", "wall_s"]
SUPERVISED = "supervised"


@dataclass
class Cell:
    """One training run of the matrix: its config and the CLI overrides that make it from `config_path`."""

    config_path: str
    overrides: list[str]
    config: RunConfig
    label: str | None = None  # the method's name in the tables when two configs share a plugin list
    baseline: str = SUPERVISED  # the name of the supervised cells this one is compared with

    @property
    def plugins(self) -> str:
        return "+".join(self.config.plugins) or SUPERVISED

    @property
    def method(self) -> str:
        return self.label or self.plugins

    @property
    def key(self) -> str:
        """Hash of what the training depends on: the core sections and the active plugins' sections."""
        d = self.config.to_dict()
        relevant = {k: v for k, v in d.items() if k in CORE_KEYS or k in self.config.plugins}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]

    def run_dir(self, root: Path) -> Path:
        c = self.config  # named by `plugins`, not `method`: a cell's directory must not depend on its peers
        return root / f"{c.data.name}-n{c.data.num_labeled}-{self.plugins}-s{c.seed}-{self.key}"

    def argv(self, root: Path) -> list[str]:
        """`ssltrain train` arguments that train this cell."""
        return ["train", self.config_path, *(a for o in self.overrides for a in ("--set", o)),
                "--out", str(self.run_dir(root))]

    def command(self, root: Path) -> str:
        return "ssltrain " + shlex.join(self.argv(root))


def build_cells(config_paths: list[str], labels: list[int], seeds: list[int], overrides: list[str],
                classes: dict[str, type], seeds_at: dict[int, list[int]] | None = None) -> list[Cell]:
    """The matrix, baselines included, without duplicates (configs may share a baseline): every label count
    at `seeds`, or at `seeds_at[labels]` where given. Configs with different baselines get baselines named
    after their files."""
    cells: dict[str, Cell] = {}
    baseline_keys: dict[str, set[str]] = {}  # config path -> keys of its baseline cells
    for path in config_paths:
        raw = load_yaml(path)
        for n in labels:
            for seed in (seeds_at or {}).get(n, seeds):
                for plugins in (None, "plugins=[]"):
                    sets = [*overrides, f"data.num_labeled={n}", f"seed={seed}", *([plugins] if plugins else [])]
                    cell = Cell(path, sets, resolve(apply_overrides(raw, sets), schemas(classes)))
                    cell = cells.setdefault(cell.key, cell)
                    if plugins:
                        baseline_keys.setdefault(path, set()).add(cell.key)
    groups: dict[frozenset, list[str]] = {}  # a set of baseline cells -> the configs that share it
    for path, keys in baseline_keys.items():
        groups.setdefault(frozenset(keys), []).append(path)
    if len(groups) > 1:
        for keys, paths in groups.items():
            name = f"{SUPERVISED} ({Path(paths[0]).stem})"
            for key in keys:
                cells[key].label = name
            for cell in cells.values():
                if cell.config_path in paths:
                    cell.baseline = name
    paths_of: dict[str, set[str]] = {}
    for cell in cells.values():
        paths_of.setdefault(cell.method, set()).add(cell.config_path)
    for cell in cells.values():  # e.g. two SLA configs: name each method by its config file instead
        if cell.config.plugins and len(paths_of[cell.method]) > 1:
            cell.label = Path(cell.config_path).stem
    return list(cells.values())


def run_cell(cell: Cell, root: Path, classes: dict[str, type]) -> dict | None:
    """Train a cell unless its summary exists (resuming an interrupted run); None if it failed."""
    run_dir = cell.run_dir(root)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    print(f"[benchmark] {'resuming' if resume else 'running'}: {cell.command(root)}", flush=True)
    try:
        return train(cell.config, run_dir, resume=resume, classes=classes)
    except Interrupted:
        raise  # SIGINT/SIGTERM stops the whole matrix, not just this cell
    except SSLTrainError as exc:
        print(f"[benchmark] FAILED {run_dir.name}: {exc}", file=sys.stderr, flush=True)
        return None


def unlabeled_ratio(cell: Cell, classes: dict[str, type]) -> str:
    """data.unlabeled_batch_size / data.batch_size for a cell that draws unlabeled rows (as the loop decides:
    some active plugin has an unlabeled loss and does not switch it off), else "-"."""
    c = cell.config
    plugins = [classes[name](c.plugin_configs.get(name)) for name in c.plugins]
    if not any(hasattr(p, "ssl_unlabeled_loss") and getattr(p, "uses_unlabeled", True) for p in plugins):
        return "-"
    return f"{c.data.unlabeled_batch_size / c.data.batch_size:g}"


def seed_major(cells: list[Cell], labels: list[int], seeds: list[int]) -> list[Cell]:
    """Cells ordered seed by seed, then by label count in the given order (stable within)."""
    return sorted(cells, key=lambda c: (seeds.index(c.config.seed), labels.index(c.config.data.num_labeled)))


def run_parallel(cells: list[Cell], root: Path, jobs: int, on_done, launcher: list[str] = ()) -> bool:
    """Train `cells` as `ssltrain train` processes, `jobs` at a time (each behind the `launcher` command
    prefix, if any), calling `on_done(cell, summary or None)` as each ends (in any order). Returns False when SIGINT/SIGTERM stopped the matrix: the
    running cells got the signal and wrote checkpoints; cells not started were left."""
    stop = {"requested": False}

    def request_stop(signum, frame):
        stop["requested"] = True

    old = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    pending, running = list(cells), {}
    try:
        while pending or running:
            while pending and len(running) < jobs and not stop["requested"]:
                cell = pending.pop(0)
                run_dir = cell.run_dir(root)
                if (run_dir / "summary.json").exists():
                    on_done(cell, json.loads((run_dir / "summary.json").read_text()))
                    continue
                resume = (run_dir / "checkpoints" / "last.pt").exists()
                print(f"[benchmark] {'resuming' if resume else 'running'}: {cell.command(root)}", flush=True)
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(run_dir / "train.log", "a") as log:
                    argv = [*launcher, sys.executable, "-m", "ssltrain", *cell.argv(root), *(["--resume"] if resume else [])]
                    running[subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)] = cell
            if stop["requested"]:
                for proc in running:
                    proc.send_signal(signal.SIGTERM)  # each cell finishes its step and writes a checkpoint
                for proc in running:
                    proc.wait()
            for proc in [p for p in running if p.poll() is not None]:
                cell = running.pop(proc)
                summary_path = cell.run_dir(root) / "summary.json"
                if summary_path.exists():
                    on_done(cell, json.loads(summary_path.read_text()))
                elif not stop["requested"]:
                    print(f"[benchmark] FAILED {summary_path.parent.name} (exit {proc.returncode}): see "
                          f"{summary_path.parent / 'train.log'}", file=sys.stderr, flush=True)
                    on_done(cell, None)
            if stop["requested"]:
                return False
            time.sleep(0.2)
        return True
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def row_of(cell: Cell, summary: dict | None, metrics: list[str] = (), u_ratio: str = "-") -> dict:
    """A table row; `metrics` are extra columns from the last evaluation (summary.json's final_eval),
    empty for cells whose plugins do not report them."""
    c = cell.config
    row = {"dataset": c.data.name, "labels": c.data.num_labeled, "method": cell.method, "seed": c.seed,
           "steps": c.train.steps, "u_ratio": u_ratio, "test_top1": None, "median_last_test_top1": None,
           "wall_s": None, **{m: "" for m in metrics}, "baseline": cell.baseline}
    if summary is not None:
        final = summary.get("final_eval", {})
        row.update(steps=summary["steps"], test_top1=round(summary["test_top1"], 2),
                   median_last_test_top1=round(summary["median_last_test_top1"], 2),
                   wall_s=round(summary["wall_seconds"], 1), **{m: round(final[m], 2) for m in metrics if m in final})
    return row


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' (std omitted for one value)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (dataset, labels, method, steps): mean ± std over seeds, and the mean gap of test_top1 to the
    method's supervised baseline over the seeds both have run."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["test_top1"] is not None:
            groups.setdefault((r["dataset"], r["labels"], r["method"], r["steps"]), []).append(r)
    out = []
    for (dataset, labels, method, steps), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], not kv[0][2].startswith(SUPERVISED), kv[0][2])):
        baseline = rs[0].get("baseline", SUPERVISED)
        base = {r["seed"]: r["test_top1"] for r in groups.get((dataset, labels, baseline, steps), [])}
        paired = [r["test_top1"] - base[r["seed"]] for r in rs if r["seed"] in base]
        gap = statistics.mean(paired) if paired else None
        extra = [k for k in rs[0] if k not in COLUMNS and k != "baseline"]  # --metric columns
        out.append({"dataset": dataset, "labels": labels, "method": method, "steps": steps,
                    "u_ratio": rs[0].get("u_ratio", "-"), "seeds": len(rs),
                    "test_top1": mean_std([r["test_top1"] for r in rs]),
                    "median_last_test_top1": mean_std([r["median_last_test_top1"] for r in rs]),
                    "vs_supervised": "-" if gap is None or method == baseline else f"{gap:+.2f}",
                    "wall_s": f"{statistics.mean(r['wall_s'] for r in rs):.0f}",
                    **{k: mean_std([r[k] for r in rs if r[k] != ""]) for k in extra}})
    return out


def accuracy_series(rows: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """method -> [(labels, mean test_top1, sample std or 0), ...] over the finished cells, sorted by labels."""
    values: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["test_top1"] is not None:
            values.setdefault(r["method"], {}).setdefault(int(r["labels"]), []).append(r["test_top1"])
    return {m: [(n, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for n, v in sorted(by.items())]
            for m, by in values.items()}


def write_plot(rows: list[dict], path: Path, title: str) -> dict[str, list[tuple[int, float, float]]]:
    """Test accuracy against the number of labels (log axis), one line per method with ± std bars over
    seeds, baselines dashed and listed first, then the methods by accuracy at their largest label count;
    saved as a PNG. Returns the plotted series."""
    series = accuracy_series(rows)
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    colors = [c for name in ("tab20", "tab20b") for c in _colormap(name)]
    order = sorted(series.items(), key=lambda kv: (not kv[0].startswith(SUPERVISED), -kv[1][-1][1]))  # legend: best last-label first
    for i, (method, points) in enumerate(order):
        n, mean, std = zip(*points)
        baseline = method.startswith(SUPERVISED)
        ax.errorbar(n, mean, yerr=std, label=method, capsize=3, marker="os^vD<>ph"[i % 9],
                    color="black" if baseline else colors[i % len(colors)], linestyle="--" if baseline else "-")
    labels = sorted({n for points in series.values() for n, _, _ in points})
    if labels:
        ax.set_xscale("log")
        ax.set_xticks(labels, [str(n) for n in labels])
        ax.minorticks_off()
    ax.set_xlabel("labeled examples")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.savefig(path, dpi=120)
    return series


def _colormap(name: str) -> list:
    from matplotlib import colormaps
    return list(colormaps[name].colors)


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0]) if rows else COLUMNS
    if all(r.get("baseline", SUPERVISED) == SUPERVISED for r in rows):
        keys = [k for k in keys if k != "baseline"]  # one baseline: the column says nothing
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("failed" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_report(rows: list[dict], commands: list[str], out: Path, name: str, invocation: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*(rows[0] if rows else COLUMNS), "command"])
        writer.writeheader()
        writer.writerows({**r, "command": c} for r, c in zip(rows, commands))
    write_plot(rows, out / f"{name}.png", name)
    text = [f"# Benchmark: {name}", "", "Reproduce (finished cells are reused, interrupted ones resumed):", "",
            f"```\n{invocation}\n```", "", "test_top1: the EMA model's test accuracy at the last step; "
            "median_last_test_top1: median over the last `train.median_last` evaluations; other columns (--metric): "
            "the last evaluation's value; "
            "mean ± sample std over seeds; vs_supervised: mean test_top1 gain over the baseline, paired by seed; "
            "u_ratio: unlabeled rows per labeled row in a step (data.unlabeled_batch_size / data.batch_size; "
            "the FixMatch-family papers use 7).", "",
            f"![test accuracy against labels]({name}.png)", "", "## Mean over seeds", "", markdown_table(aggregate(rows)),
            "", "## Every run", "", markdown_table(rows), ""]
    (out / f"{name}.md").write_text("\n".join(text))


# --- sizing: per-step cost of every method ---------------------------------------------------------

def time_cell(cell: Cell, steps: int, classes: dict[str, type]) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluation) of `cell`'s config trained for `steps` steps
    in a temporary directory (one evaluation, at the end; start-up excluded)."""
    config = cell.config.model_copy(deep=True)
    config.train = config.train.model_copy(update={"steps": steps, "eval_every": steps, "log_every": steps,
                                                   "checkpoint_every": steps, "progress": "lines"})
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, classes)
        trainer.fit()
    return trainer.seconds["train"] / steps, trainer.seconds["wall"] - trainer.seconds["train"]


def measure_costs(cells: list[Cell], steps: int, rounds: int, classes: dict[str, type]) -> dict[str, tuple[float, float]]:
    """method -> (median seconds per step, median seconds per evaluation) over `rounds` rounds in turns,
    timing one cell per method (the first of the matrix)."""
    first: dict[str, Cell] = {}
    for cell in cells:
        first.setdefault(cell.method, cell)
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in first}
    for r in range(rounds):
        for method, cell in first.items():
            times[method].append(time_cell(cell, steps, classes))
            print(f"[benchmark] cost round {r + 1}/{rounds} {method}: {times[method][-1][0]:.3f} s/step", flush=True)
    return {m: (statistics.median(t for t, _ in ts), statistics.median(e for _, e in ts)) for m, ts in times.items()}


def cost_table(cells: list[Cell], costs: dict[str, tuple[float, float]]) -> tuple[list[dict], float]:
    """Per method: seconds per step and per evaluation, relative cost, cells and projected CPU hours of the
    matrix (steps * s/step + evaluations * s/eval per cell); and the matrix's total hours."""
    base = next((costs[m][0] for m in costs if m.startswith(SUPERVISED)), None)
    fixmatch = costs.get("fixmatch", (None,))[0]
    rows, total = [], 0.0
    for method, (step_s, eval_s) in sorted(costs.items(), key=lambda kv: kv[1][0]):
        mine = [c for c in cells if c.method == method]
        seconds = sum(c.config.train.steps * step_s + (c.config.train.steps // c.config.train.eval_every) * eval_s
                      for c in mine)
        total += seconds
        rows.append({"method": method, "s_per_step": f"{step_s:.3f}",
                     "x_supervised": f"{step_s / base:.1f}" if base else "-",
                     "x_fixmatch": f"{step_s / fixmatch:.2f}" if fixmatch else "-",
                     "s_per_eval": f"{eval_s:.1f}", "cells": len(mine), "cpu_hours": f"{seconds / 3600:.2f}"})
    return rows, total / 3600


def write_cost_report(rows: list[dict], total_hours: float, out: Path, name: str, invocation: str, steps: int,
                      rounds: int) -> str:
    text = "\n".join([f"# Per-step cost: {name}", "", f"```\n{invocation}\n```", "",
                      f"Each method trained {steps} steps, {rounds} round(s) in turns; medians. cpu_hours: the "
                      f"method's cells in the matrix at their configured steps and evaluations.", "",
                      markdown_table(rows), "", f"Projected total: **{total_hours:.2f} CPU-hours** "
                      f"(single-threaded cells, one after another).", ""])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_cost.md").write_text(text)
    return text


def seeds_at_label(text: str) -> tuple[int, list[int]]:
    """'40=0,1' -> (40, [0, 1]): the argument of --seeds-at."""
    try:
        labels, seeds = text.split("=")
        return int(labels), [int(s) for s in seeds.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABELS=SEED,SEED,... e.g. 40=0,1") from None


def arguments() -> argparse.ArgumentParser:
    """The command line of the harness."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+", help="YAML configs of the methods (the baseline is derived from each)")
    p.add_argument("--labels", type=int, nargs="+", required=True, help="values of data.num_labeled")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="values of seed (split and initialisation)")
    p.add_argument("--seeds-at", action="append", default=[], metavar="LABELS=SEEDS", type=seeds_at_label,
                   help="other seeds at one label count, e.g. --seeds 0 1 2 --seeds-at 40=0,1 (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every cell")
    p.add_argument("--name", default="benchmark", help="report file name (without extension)")
    p.add_argument("--out", default="results", help="folder of the report (Markdown and CSV)")
    p.add_argument("--runs", default="runs/benchmark", help="folder of the cells' run directories")
    p.add_argument("--metric", action="append", default=[], metavar="KEY",
                   help="extra column from the last evaluation, e.g. sla/top1_si or flowgmm/bpd (summary.json final_eval)")
    p.add_argument("--cost", type=int, metavar="STEPS",
                   help="instead of running the matrix, time every method for STEPS steps and project its CPU time")
    p.add_argument("--cost-rounds", type=int, default=1, metavar="R", help="--cost: rounds of timings (medians)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at a time, each in its own process")
    p.add_argument("--launcher", default="", metavar="CMD",
                   help="--jobs: command prefix of every cell's process, e.g. a CPU-slot wrapper or 'nice -n 10'")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = arguments().parse_args(argv)
    classes = discover()
    try:
        cells = build_cells(args.configs, args.labels, args.seeds, args.set, classes, dict(args.seeds_at))
    except SSLTrainError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    invocation = "python tools/benchmark.py " + shlex.join(argv)
    if args.cost:
        rows, total = cost_table(cells, measure_costs(cells, args.cost, args.cost_rounds, classes))
        print(write_cost_report(rows, total, Path(args.out), args.name, invocation, args.cost, args.cost_rounds))
        return 0
    root = Path(args.runs)
    if args.jobs > 1:
        return run_matrix_parallel(cells, root, args, invocation, classes)
    rows, commands = [], []
    for i, cell in enumerate(cells):
        print(f"[benchmark] cell {i + 1}/{len(cells)}: {cell.run_dir(root).name}", flush=True)
        try:
            summary = run_cell(cell, root, classes)
        except Interrupted as exc:
            print(f"[benchmark] {exc}; run the same command again to resume the matrix", file=sys.stderr)
            return 130
        rows.append(row_of(cell, summary, args.metric, unlabeled_ratio(cell, classes)))
        commands.append(cell.command(root))
        write_report(rows, commands, Path(args.out), args.name, invocation)  # partial tables as cells finish
    return 0 if all(r["test_top1"] is not None for r in rows) else 1


def run_matrix_parallel(cells: list[Cell], root: Path, args, invocation: str, classes: dict[str, type]) -> int:
    """--jobs N: the matrix seed-major in N processes; tables (in the matrix's order) rewritten as cells end."""
    done: dict[int, dict | None] = {}

    def on_done(cell: Cell, summary: dict | None) -> None:
        done[id(cell)] = summary
        print(f"[benchmark] {len(done)}/{len(cells)} cells done: {cell.run_dir(root).name}", flush=True)
        finished = [c for c in cells if id(c) in done]
        write_report([row_of(c, done[id(c)], args.metric, unlabeled_ratio(c, classes)) for c in finished], [c.command(root) for c in finished],
                     Path(args.out), args.name, invocation)

    seeds = list(dict.fromkeys([*args.seeds, *(s for _, more in args.seeds_at for s in more)]))
    if not run_parallel(seed_major(cells, args.labels, seeds), root, args.jobs, on_done, shlex.split(args.launcher)):
        print("[benchmark] stopped by signal; run the same command again to resume the matrix", file=sys.stderr)
        return 130
    return 0 if all(s is not None for s in done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
