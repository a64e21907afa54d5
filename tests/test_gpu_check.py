"""tools/gpu_check.py: the dry run rehearses the GPU command on the CPU (every part, the report's layout,
at most 8 files), and the leaderboard's cut rule drops seeds first, then label counts, then steps."""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import TINY

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def small_configs(folder: Path) -> str:
    """Two leaderboard configs on two moons (1000 training points, so that 250 labels fit), 4 steps."""
    folder.mkdir()
    for name, sections in {"mixmatch": {"plugins": ["mixmatch"], "mixmatch": {"rampup_steps": 2}},
                           "pi_model": {"plugins": ["pi_model"]}}.items():
        config = {**TINY, "data": {**TINY["data"], "options": {**TINY["data"]["options"], "n_train": 1000}},
                  "train": {**TINY["train"], "steps": 4, "eval_every": 2}, **sections}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return str(folder / "*.yaml")


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dry_run_rehearses_every_part_in_the_report_layout(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--leaderboard-configs", small_configs(tmp_path / "lb")],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= set(gpu_check.FILES) and len(files) <= 8 and "report.md" in files, files
    report = (out / "report.md").read_text()
    for i, part in enumerate(gpu_check.PARTS, 1):
        assert f"## {i}. {part}" in report
        status = report.split(f"## {i}. {part}")[1].split("Status: ")[1].splitlines()[0]
        assert status.startswith(("done", "time limit")), (part, status)  # never "failed", never "not run"

    env = {r["key"]: r["value"] for r in read_csv(out / "environment.csv")}
    assert env["ssltrain importable"] == "yes" and env["torch"]

    tests = read_csv(out / "cuda_tests.csv")
    names = {t["test"] for t in tests}
    assert {"test_process_group_of_size_one", "test_compiled_step_matches_eager_and_trains",
            "test_checkpoint_written_on_the_gpu_resumes_on_the_cpu"} <= names
    assert not [t for t in tests if t["outcome"] == "failed"], tests  # the CUDA tests' code works on the CPU

    rows = read_csv(out / "throughput.csv")  # every variant's rows; the first two run (eager; compiled on one shape)
    first, compiled = gpu_check.VARIANTS[0][0], gpu_check.VARIANTS[1][0]
    assert [(r["variant"], r["shape"]) for r in rows] == [
        (v, s) for v, _, shapes in gpu_check.VARIANTS for s in (["small_cnn_mixmatch"] if v == compiled else shapes)]
    assert rows[0]["status"] == "ok" and float(rows[0]["steps_per_s"]) > 0 and rows[0]["target"] == "500"
    for r in rows:
        ran = r["variant"] in (first, compiled)
        assert r["status"] in ("ok", "not run (time limit)") if ran else r["status"] == "skipped (dry run)", r

    assert gpu_check.CUT_RULE in report and "Plan: labels" in report
    assert read_csv(out / "concurrency.csv")[0]["processes"] == "1"
    if (out / "leaderboard.csv").exists():  # cells that finished in time, none failed
        cells = read_csv(out / "leaderboard.csv")
        assert {r["method"] for r in cells} <= {"supervised", "mixmatch", "pi_model"}
        assert all(r["test_top1"] for r in cells) and "| dataset | labels | method |" in report


def count(n_methods):
    """Cells of a matrix with one shared baseline per (labels, seed)."""
    return lambda labels, seeds, steps: (n_methods + 1) * len(labels) * len(seeds)


def plan(seconds, counter=count(8), steps=20000):
    return gpu_check.plan_matrix(counter, [250, 40], [0, 1, 2], steps, rate=100.0, overhead=10.0, jobs=9,
                                 seconds=seconds, min_steps=5000)


def test_cut_rule_drops_seeds_first_then_label_counts_then_steps():
    per_round = (20000 / 100 + 10) * gpu_check.SAFETY  # 9 cells (8 methods + baseline) per (labels, seed): one round
    labels, seeds, steps, lines = plan(6 * per_round)
    assert (labels, seeds, steps) == ([250, 40], [0, 1, 2], 20000) and "nothing cut" in lines[-1]
    assert plan(5 * per_round)[:3] == ([250, 40], [0, 1], 20000)
    assert plan(2 * per_round)[:3] == ([250, 40], [0], 20000)
    labels, seeds, steps, lines = plan(per_round)
    assert (labels, seeds, steps) == ([250], [0], 20000) and "CUT: 2 seed(s), labels [40]." in lines[-1]
    assert plan((10000 / 100 + 10) * gpu_check.SAFETY)[:3] == ([250], [0], 10000)
    labels, seeds, steps, lines = plan(30)  # nothing fits: the smallest plan runs until the time limit
    assert (labels, seeds, steps) == ([250], [0], 5000) and any("Nothing fits" in line for line in lines)
    assert plan(0, counter=lambda *a: 0)[:3] == ([250, 40], [0, 1, 2], 20000)  # finished cells cost nothing


def test_throughput_rows_compare_with_the_targets_and_the_eager_row():
    result = {"images_per_step": 192, "ssltrain_steps_per_s": 600.0, "samples_per_s": 115200.0,
              "plain_steps_per_s": 620.0, "ratio": 1.03, "peak_memory_mb": 900.0, "plain_peak_memory_mb": 880.0,
              "dispatch_share": 0.004, "ssltrain_gflop_per_s": 5000.0}
    eager = gpu_check.throughput_row("small_cnn_mixmatch", gpu_check.VARIANTS[0][0], "ok", result, [])
    assert (eager["meets_target"], eager["target"], eager["vs_eager"]) == ("yes", "500", "1.00")
    slower = gpu_check.throughput_row("small_cnn_mixmatch", gpu_check.VARIANTS[3][0], "ok",
                                      {**result, "ssltrain_steps_per_s": 300.0}, [eager])
    assert (slower["meets_target"], slower["vs_eager"]) == ("NO", "0.50")
    missing = gpu_check.throughput_row("supervised", "x", "not run (time limit)", None, [eager])
    assert missing["steps_per_s"] == "" and missing["target"] == ""
