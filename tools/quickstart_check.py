"""Measure the quickstart claim: SSL vs the supervised baseline on the same labels, seeds 0-2.

    python tools/quickstart_check.py [--config configs/quickstart.yaml] [--seeds 0 1 2]
Prints one line per run and the medians; exits 1 if the SSL median is below 90% or less than
5 points above the baseline's median.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from ssltrain.cli import load_config
from ssltrain.loop import train
from ssltrain.plugins import discover


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    classes = discover()
    results = {"ssl": [], "supervised": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method, extra in [("ssl", []), ("supervised", ["plugins=[]"])]:
                config = load_config(args.config, [f"seed={seed}", "train.progress=lines", *extra], classes)
                summary = train(config, Path(tmp) / f"{method}-{seed}", classes=classes)
                results[method].append(summary["test_top1"])
                print(f"seed {seed} {method:10s} test_top1 {summary['test_top1']:.2f} "
                      f"({summary['wall_seconds']:.1f}s)", flush=True)
    ssl, sup = statistics.median(results["ssl"]), statistics.median(results["supervised"])
    print(f"median test_top1: ssl {ssl:.2f}  supervised {sup:.2f}  gap {ssl - sup:+.2f}")
    return 0 if ssl >= 90 and ssl - sup >= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
