"""Benchmark matrix: configs x label counts x seeds, always with the supervised baseline.

    python tools/benchmark.py configs/mixmatch_fashion_mnist.yaml --labels 40 250 1000 --seeds 0 1 \
        [--set train.steps=3000 ...] [--name fashion_mnist] [--out results] [--runs runs/benchmark]

Every config is run at every label count (`data.num_labeled`) and seed (`seed`: the labeled split
and the initialisation). For each config the supervised baseline is the same config with
`plugins=[]`: same model, augmentation, optimizer, EMA and steps. Each cell trains in its own run
directory, named by a hash of its resolved config; a cell with a summary.json is not re-run and an
interrupted one resumes from its checkpoint, so re-running the command continues the matrix.
The hash covers defaults too: a new option in a plugin's Config (even one that keeps the old
behaviour) gives that plugin's cells new names, and they are re-run.
Writes `<out>/<name>.md` and `<out>/<name>.csv` (every cell, plus mean ± std over seeds) with the
command that reproduces them.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from ssltrain.config import CORE_KEYS, RunConfig, apply_overrides, load_yaml, resolve
from ssltrain.errors import Interrupted, SSLTrainError
from ssltrain.loop import train
from ssltrain.plugins import discover, schemas

COLUMNS = ["dataset", "labels", "method", "seed", "steps", "test_top1", "median_last_test_top1", "wall_s"]


@dataclass
class Cell:
    """One training run of the matrix: its config and the CLI overrides that make it from `config_path`."""

    config_path: str
    overrides: list[str]
    config: RunConfig
    label: str | None = None  # the method's name in the tables when two configs share a plugin list

    @property
    def plugins(self) -> str:
        return "+".join(self.config.plugins) or "supervised"

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

    def command(self, root: Path) -> str:
        sets = " ".join(f"--set {shlex.quote(o)}" for o in self.overrides)
        return f"ssltrain train {shlex.quote(self.config_path)} {sets} --out {shlex.quote(str(self.run_dir(root)))}"


def build_cells(config_paths: list[str], labels: list[int], seeds: list[int], overrides: list[str],
                classes: dict[str, type]) -> list[Cell]:
    """The matrix, baselines included, without duplicates (configs may share a baseline)."""
    cells: dict[str, Cell] = {}
    for path in config_paths:
        raw = load_yaml(path)
        for n in labels:
            for seed in seeds:
                for plugins in (None, "plugins=[]"):
                    sets = [*overrides, f"data.num_labeled={n}", f"seed={seed}", *([plugins] if plugins else [])]
                    cell = Cell(path, sets, resolve(apply_overrides(raw, sets), schemas(classes)))
                    cells.setdefault(cell.key, cell)
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


def row_of(cell: Cell, summary: dict | None, metrics: list[str] = ()) -> dict:
    """A table row; `metrics` are extra columns from the last evaluation (summary.json's final_eval),
    empty for cells whose plugins do not report them."""
    c = cell.config
    row = {"dataset": c.data.name, "labels": c.data.num_labeled, "method": cell.method, "seed": c.seed,
           "steps": c.train.steps, "test_top1": None, "median_last_test_top1": None, "wall_s": None,
           **{m: "" for m in metrics}}
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
    supervised baseline over the seeds both have run."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["test_top1"] is not None:
            groups.setdefault((r["dataset"], r["labels"], r["method"], r["steps"]), []).append(r)
    out = []
    for (dataset, labels, method, steps), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "supervised", kv[0][2])):
        base = {r["seed"]: r["test_top1"] for r in groups.get((dataset, labels, "supervised", steps), [])}
        paired = [r["test_top1"] - base[r["seed"]] for r in rs if r["seed"] in base]
        gap = statistics.mean(paired) if paired else None
        extra = [k for k in rs[0] if k not in COLUMNS]  # --metric columns
        out.append({"dataset": dataset, "labels": labels, "method": method, "steps": steps, "seeds": len(rs),
                    "test_top1": mean_std([r["test_top1"] for r in rs]),
                    "median_last_test_top1": mean_std([r["median_last_test_top1"] for r in rs]),
                    "vs_supervised": "-" if gap is None or method == "supervised" else f"{gap:+.2f}",
                    "wall_s": f"{statistics.mean(r['wall_s'] for r in rs):.0f}",
                    **{k: mean_std([r[k] for r in rs if r[k] != ""]) for k in extra}})
    return out


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0]) if rows else COLUMNS
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("failed" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_report(rows: list[dict], commands: list[str], out: Path, name: str, invocation: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*(rows[0] if rows else COLUMNS), "command"])
        writer.writeheader()
        writer.writerows({**r, "command": c} for r, c in zip(rows, commands))
    text = [f"# Benchmark: {name}", "", "Reproduce (finished cells are reused, interrupted ones resumed):", "",
            f"```\n{invocation}\n```", "", "test_top1: the EMA model's test accuracy at the last step; "
            "median_last_test_top1: median over the last `train.median_last` evaluations; other columns (--metric): "
            "the last evaluation's value; "
            "mean ± sample std over seeds; vs_supervised: mean test_top1 gain over the baseline, paired by seed.", "", "## Mean over seeds", "", markdown_table(aggregate(rows)), "",
            "## Every run", "", markdown_table(rows), ""]
    (out / f"{name}.md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+", help="YAML configs of the methods (the baseline is derived from each)")
    p.add_argument("--labels", type=int, nargs="+", required=True, help="values of data.num_labeled")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="values of seed (split and initialisation)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every cell")
    p.add_argument("--name", default="benchmark", help="report file name (without extension)")
    p.add_argument("--out", default="results", help="folder of the report (Markdown and CSV)")
    p.add_argument("--runs", default="runs/benchmark", help="folder of the cells' run directories")
    p.add_argument("--metric", action="append", default=[], metavar="KEY",
                   help="extra column from the last evaluation, e.g. sla/top1_si or flowgmm/bpd (summary.json final_eval)")
    args = p.parse_args(argv)
    classes = discover()
    try:
        cells = build_cells(args.configs, args.labels, args.seeds, args.set, classes)
    except SSLTrainError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    root = Path(args.runs)
    invocation = "python tools/benchmark.py " + shlex.join(argv)
    rows, commands = [], []
    for i, cell in enumerate(cells):
        print(f"[benchmark] cell {i + 1}/{len(cells)}: {cell.run_dir(root).name}", flush=True)
        try:
            summary = run_cell(cell, root, classes)
        except Interrupted as exc:
            print(f"[benchmark] {exc}; run the same command again to resume the matrix", file=sys.stderr)
            return 130
        rows.append(row_of(cell, summary, args.metric))
        commands.append(cell.command(root))
        write_report(rows, commands, Path(args.out), args.name, invocation)  # partial tables as cells finish
    return 0 if all(r["test_top1"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
