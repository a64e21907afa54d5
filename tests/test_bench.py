"""tools/bench.py keeps working: both loops run the same shapes (no timing is asserted)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import bench  # noqa: E402


def test_bench_times_ssltrain_and_the_plain_loop():
    args = argparse.Namespace(steps=2, warmup=1, device="cpu", amp="none", compile=False, channels_last=False,
                              threads=1)
    bench.SHAPES["tiny"] = ("small_cnn", {"width": 4}, (1, 12, 12), 8, 8, ["pi_model"])
    try:
        times, calls, peak = bench.time_ssltrain("tiny", args)
        plain, plain_peak, flops = bench.time_plain("tiny", args)
    finally:
        del bench.SHAPES["tiny"]
    assert len(times) == len(plain) == 2 and all(t > 0 for t in times + plain)
    assert calls >= 8 and peak > 0 and plain_peak > 0
    assert flops > 3 * 8 * 2 * 4 * 9 * 12 * 12  # at least the first convolution's forward and backward
    assert bench.dispatch_seconds() < 1e-3


def test_step_cost_times_methods_relative_to_the_first(tmp_path, capsys):
    import json

    import yaml

    import step_cost
    from conftest import TINY
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "cost.json"
    step_cost.main([str(config), "--methods", "fixmatch", "supervised", "fixmatch,ns3l", "--steps", "2",
                    "--warmup", "1", "--rounds", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["fixmatch", "supervised", "fixmatch,ns3l"]
    assert rows[0]["ratio"] == 1.0 and all(r["step_s"] > 0 for r in rows)
    assert "x1.00" in capsys.readouterr().out
