"""The benchmark harness on a tiny two-moons matrix: baselines always present and shared,
tables written, finished cells reused, missing ones (re)run."""
from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY

spec = importlib.util.spec_from_file_location("benchmark", Path(__file__).parents[1] / "tools" / "benchmark.py")
benchmark = sys.modules["benchmark"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def write_config(path: Path, **sections) -> str:
    path.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "steps": 4, "eval_every": 2}, **sections}))
    return str(path)


def run_matrix(tmp_path, configs, *extra):
    argv = [*configs, "--labels", "4", "8", "--seeds", "0", "1", "--name", "tiny",
            "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), *extra]
    return benchmark.main(argv)


def read_rows(tmp_path):
    with open(tmp_path / "results" / "tiny.csv") as f:
        return list(csv.DictReader(f))


def test_matrix_with_shared_baseline_tables_and_resume(tmp_path, monkeypatch, capsys):
    mm = write_config(tmp_path / "mm.yaml", plugins=["mixmatch"], mixmatch={"rampup_steps": 2})
    pi = write_config(tmp_path / "pi.yaml", plugins=["pi_model"])
    assert run_matrix(tmp_path, [mm, pi]) == 0
    rows = read_rows(tmp_path)
    cells = {(r["method"], r["labels"], r["seed"]) for r in rows}
    assert len(rows) == len(cells) == 3 * 2 * 2  # mixmatch, pi_model and ONE shared baseline per (labels, seed)
    assert {m for m, _, _ in cells} == {"mixmatch", "pi_model", "supervised"}
    for r in rows:
        assert r["dataset"] == "two_moons" and r["steps"] == "4" and 0 <= float(r["test_top1"]) <= 100
        assert r["command"].startswith("ssltrain train ") and (Path(r["command"].split("--out ")[1]) / "summary.json").exists()
    assert all("--set 'plugins=[]'" in r["command"] for r in rows if r["method"] == "supervised")
    assert {(r["method"], r["u_ratio"]) for r in rows} == {("mixmatch", "2"), ("pi_model", "2"), ("supervised", "-")}
    assert {r["baseline"] for r in rows} == {"supervised"} and (tmp_path / "results" / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "results" / "tiny.md").read_text()
    assert "python tools/benchmark.py " + mm in report and "| two_moons | 8 | supervised |" in report

    # finished cells are not re-run; a cell without its summary is redone (resumed from its checkpoint)
    victim = Path(rows[0]["command"].split("--out ")[1])
    (victim / "summary.json").unlink()
    capsys.readouterr()
    assert run_matrix(tmp_path, [mm, pi]) == 0
    log = capsys.readouterr().out
    assert log.count("[benchmark] resuming") == 1 and "[benchmark] running" not in log
    assert (victim / "summary.json").exists() and read_rows(tmp_path) == rows

    # a different budget is a different cell
    monkeypatch.setattr(benchmark, "train", lambda *a, **k: {"steps": 5, "test_top1": 50.0, "wall_seconds": 1.0,
                                                             "median_last_test_top1": 50.0})
    assert run_matrix(tmp_path, [mm], "--set", "train.steps=5") == 0
    assert {r["steps"] for r in read_rows(tmp_path)} == {"5"}


def test_aggregate_mean_std_and_gap():
    rows = [{"dataset": "d", "labels": 4, "method": m, "seed": s, "steps": 9, "test_top1": v,
             "median_last_test_top1": v, "wall_s": 1.0}
            for m, s, v in [("supervised", 0, 60.0), ("supervised", 1, 62.0), ("mixmatch", 0, 70.0), ("mixmatch", 1, 74.0)]]
    agg = benchmark.aggregate(rows)
    assert [a["method"] for a in agg] == ["supervised", "mixmatch"]
    assert agg[1]["test_top1"] == "72.00 ± 2.83" and agg[1]["vs_supervised"] == "+11.00"
    agg = benchmark.aggregate(rows[:1] + rows[2:])  # baseline of seed 1 missing: the gap pairs seeds
    assert agg[1]["vs_supervised"] == "+10.00"
    assert benchmark.mean_std([61.5]) == "61.50"


def test_configs_sharing_a_plugin_list_are_named_by_their_files(tmp_path):
    a = write_config(tmp_path / "pi_fast.yaml", plugins=["pi_model"], pi_model={"weight": 1.0})
    b = write_config(tmp_path / "pi_slow.yaml", plugins=["pi_model"], pi_model={"weight": 2.0})
    cells = benchmark.build_cells([a, b], [4], [0], [], benchmark.discover())
    assert sorted(c.method for c in cells) == ["pi_fast", "pi_slow", "supervised"]
    assert all("-pi_model-" in c.run_dir(tmp_path).name for c in cells if c.config.plugins)  # dirs from plugins
    alone = benchmark.build_cells([a], [4], [0], [], benchmark.discover())
    assert sorted(c.method for c in alone) == ["pi_model", "supervised"]


def test_metric_columns_from_the_last_evaluation(tmp_path, monkeypatch):
    def fake_train(config, run_dir, resume, classes):
        final = {"pi_model/agreement": 90.0 + config.seed} if config.plugins else {}
        return {"steps": 4, "test_top1": 50.0, "median_last_test_top1": 50.0, "wall_seconds": 1.0, "final_eval": final}

    monkeypatch.setattr(benchmark, "train", fake_train)
    pi = write_config(tmp_path / "pi.yaml", plugins=["pi_model"])
    assert run_matrix(tmp_path, [pi], "--metric", "pi_model/agreement") == 0
    rows = read_rows(tmp_path)
    assert {(r["method"], r["seed"], r["pi_model/agreement"]) for r in rows if r["labels"] == "4"} == {
        ("pi_model", "0", "90.0"), ("pi_model", "1", "91.0"), ("supervised", "0", ""), ("supervised", "1", "")}
    report = (tmp_path / "results" / "tiny.md").read_text()
    assert "| pi_model/agreement |" in report and "| 90.50 ± 0.71 |" in report


def test_a_signal_stops_the_whole_matrix(tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(config, run_dir, resume, classes):
        calls.append(run_dir)
        raise benchmark.Interrupted("stopped by signal at step 2; checkpoint written")

    monkeypatch.setattr(benchmark, "train", interrupted)
    pi = write_config(tmp_path / "pi.yaml", plugins=["pi_model"])
    assert run_matrix(tmp_path, [pi]) == 130
    assert len(calls) == 1 and "run the same command again" in capsys.readouterr().err


def test_configs_with_different_baselines_get_their_own(tmp_path):
    a = write_config(tmp_path / "small.yaml", plugins=["pi_model"])
    b = write_config(tmp_path / "wide.yaml", plugins=["vat"], model={"name": "mlp", "options": {"hidden": [32]}})
    cells = benchmark.build_cells([a, b], [4], [0, 1], [], benchmark.discover())
    assert sorted({c.method for c in cells}) == ["pi_model", "supervised (small)", "supervised (wide)", "vat"]
    assert {c.method: c.baseline for c in cells if c.config.plugins} == {"pi_model": "supervised (small)",
                                                                        "vat": "supervised (wide)"}
    shared = benchmark.build_cells([a, write_config(tmp_path / "v.yaml", plugins=["vat"])], [4], [0], [], benchmark.discover())
    assert sorted(c.method for c in shared) == ["pi_model", "supervised", "vat"]
    assert {c.baseline for c in shared} == {"supervised"}


def test_aggregate_pairs_each_method_with_its_own_baseline():
    rows = [{"dataset": "d", "labels": 4, "method": m, "seed": 0, "steps": 9, "test_top1": v, "median_last_test_top1": v,
             "wall_s": 1.0, "baseline": b}
            for m, v, b in [("supervised (a)", 60.0, "supervised (a)"), ("supervised (b)", 50.0, "supervised (b)"),
                            ("x", 65.0, "supervised (a)"), ("y", 65.0, "supervised (b)")]]
    gaps = {a["method"]: a["vs_supervised"] for a in benchmark.aggregate(rows)}
    assert gaps == {"supervised (a)": "-", "supervised (b)": "-", "x": "+5.00", "y": "+15.00"}
    assert "| baseline |" in benchmark.markdown_table(rows)
    assert "baseline" not in benchmark.markdown_table([{**r, "baseline": "supervised"} for r in rows[:1]])


def test_plot_has_one_line_per_method_with_seed_spread(tmp_path):
    rows = [{"method": m, "labels": n, "test_top1": v}
            for m, n, v in [("supervised", 40, 50.0), ("supervised", 40, 54.0), ("supervised", 250, 70.0),
                            ("fixmatch", 40, 60.0), ("fixmatch", 250, 80.0), ("fixmatch", 250, None)]]
    series = benchmark.write_plot(rows, tmp_path / "p.png", "title")
    assert series == {"supervised": [(40, 52.0, pytest.approx(2.828, abs=1e-3)), (250, 70.0, 0.0)],
                      "fixmatch": [(40, 60.0, 0.0), (250, 80.0, 0.0)]}
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_cost_mode_times_every_method_and_projects_the_matrix(tmp_path, monkeypatch, capsys):
    pi = write_config(tmp_path / "pi.yaml", plugins=["pi_model"])  # 4 steps, an evaluation every 2
    assert run_matrix(tmp_path, [pi], "--cost", "2") == 0  # real timings, two steps each
    report = (tmp_path / "results" / "tiny_cost.md").read_text()
    assert "| pi_model |" in report and "| supervised |" in report and "CPU-hours" in report
    assert not (tmp_path / "runs").exists()  # nothing of the matrix ran

    calls = []

    def fake_time(cell, steps, classes):
        calls.append((cell.method, steps))
        return (0.5, 2.0) if cell.config.plugins else (0.1, 1.0)

    monkeypatch.setattr(benchmark, "time_cell", fake_time)
    cells = benchmark.build_cells([pi], [4, 8], [0, 1], [], benchmark.discover())
    rows, hours = benchmark.cost_table(cells, benchmark.measure_costs(cells, 3, 2, benchmark.discover()))
    assert sorted(calls) == [("pi_model", 3)] * 2 + [("supervised", 3)] * 2  # one cell per method, each round
    by = {r["method"]: r for r in rows}
    assert by["pi_model"]["x_supervised"] == "5.0" and by["pi_model"]["cells"] == 4
    # per cell 4 steps * 0.5 s + 2 evaluations * 2 s = 6 s; supervised 4 * 0.1 + 2 * 1 = 2.4 s
    assert hours == pytest.approx(4 * (6 + 2.4) / 3600)


def test_parallel_cells_seed_by_seed_same_results_and_resume(tmp_path, capsys):
    pi = write_config(tmp_path / "pi.yaml", plugins=["pi_model"])
    argv = [pi, "--labels", "4", "--seeds", "0", "1", "--name", "tiny", "--out", str(tmp_path / "results")]
    assert benchmark.main([*argv, "--runs", str(tmp_path / "in_process")]) == 0
    sequential = read_rows(tmp_path)
    capsys.readouterr()
    parallel_argv = [*argv, "--runs", str(tmp_path / "runs"), "--jobs", "2"]
    assert benchmark.main(parallel_argv) == 0  # 4 cells, 2 at a time, each its own `ssltrain train` process
    starts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[benchmark] running")]
    assert ["seed=0" in line for line in starts] == [True, True, False, False]  # every seed-0 cell first
    rows = read_rows(tmp_path)
    assert [(r["method"], r["seed"], r["test_top1"]) for r in rows] == [  # the numbers of the in-process cells
        (r["method"], r["seed"], r["test_top1"]) for r in sequential]

    victim = Path(rows[0]["command"].split("--out ")[1])
    (victim / "summary.json").unlink()
    assert benchmark.main(parallel_argv) == 0
    log = capsys.readouterr().out
    assert log.count("[benchmark] resuming") == 1 and "[benchmark] running" not in log and read_rows(tmp_path) == rows


def test_seeds_at_gives_one_label_count_its_own_seeds(tmp_path, capsys):
    pi = write_config(tmp_path / "pi.yaml", plugins=["pi_model"])
    cells = benchmark.build_cells([pi], [4, 8], [0, 1, 2], [], benchmark.discover(), {4: [0, 1]})
    assert sorted({(c.config.data.num_labeled, c.config.seed) for c in cells}) == [
        (4, 0), (4, 1), (8, 0), (8, 1), (8, 2)]
    assert len(cells) == 2 * 5  # pi_model and the baseline in each
    with pytest.raises(SystemExit):
        benchmark.main([pi, "--labels", "4", "--seeds-at", "4:0,1"])
    assert "expected LABELS=SEED,SEED" in capsys.readouterr().err


def test_parallel_cells_run_behind_the_launcher_at_the_seeds_at_seeds(tmp_path):
    pi = write_config(tmp_path / "pi.yaml", plugins=["pi_model"])
    launcher = tmp_path / "slot.sh"
    launcher.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "launched"}\nexec "$@"\n')
    launcher.chmod(0o755)
    argv = [pi, "--labels", "4", "--seeds", "0", "--seeds-at", "4=1", "--name", "tiny", "--out",
            str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--jobs", "2", "--launcher", str(launcher)]
    assert benchmark.main(argv) == 0
    assert sorted((r["method"], r["seed"]) for r in read_rows(tmp_path)) == [("pi_model", "1"), ("supervised", "1")]
    launched = (tmp_path / "launched").read_text().splitlines()
    assert len(launched) == 2 and all(" -m ssltrain train " in line for line in launched)
