"""tools/stream_bench.py runs (its figures are measured on real sizes, not here)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import stream_bench  # noqa: E402


def test_each_measurement_runs_on_a_tiny_set(tmp_path, monkeypatch):
    args = argparse.Namespace(device="cpu", workers=1, threads=1, memory_steps=2, steps=2, warmup=1, rounds=1,
                              throughput_images=100)
    root = stream_bench.image_set(tmp_path, 16, 40, train=3, test=2, classes=4)
    assert stream_bench.throughput(root, 16, args)["images_per_s_per_worker"] > 0
    point = stream_bench.memory_point(root, 16, 20, args)
    assert point["images"] == 4 * 3 + 20 + 4 * 2 and point["main_peak_rss_mib"] > 0
    assert 0 < point["tree_peak_pss_anon_mib"] <= point["tree_peak_pss_mib"]
    stream_bench.print_tables({"memory": [point, point], "throughput": [], "step": []})
    monkeypatch.setitem(stream_bench.STEP_BATCHES, "small_cnn", (4, 8))
    row = stream_bench.step_comparison(root, "small_cnn", args)
    assert row["resident_step_s"] > 0 and row["streamed_step_s"] > 0
