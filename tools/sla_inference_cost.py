"""SLA inference cost: AG against SI on the 10,000 Fashion-MNIST test images, with the model that
configs/sla_fashion_mnist.yaml builds (batches of 256, eval mode, 1 thread, median of 5 alternating passes).

    python tools/sla_inference_cost.py
"""
import argparse
import statistics
import tempfile
import time

import torch

from ssltrain.cli import load_config
from ssltrain.loop import Trainer
from ssltrain.plugins import discover
from ssltrain_plugins.sla import predict_scores


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    config = load_config("configs/sla_fashion_mnist.yaml", [], discover())
    trainer = Trainer(config, tempfile.mkdtemp())
    transforms = trainer.pm.get_plugin("sla").transforms
    model = trainer.model.eval()
    x = trainer.augment(trainer.data.test_x, "none")

    def seconds(mode: str) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for part in x.split(256):
                predict_scores(model, part, mode, transforms)
        return time.perf_counter() - start

    times = {"si": [], "ag": []}
    for _ in range(5):
        for mode in times:
            times[mode].append(seconds(mode))
    si, ag = statistics.median(times["si"]), statistics.median(times["ag"])
    print(f"SI {si:.3f} s, AG {ag:.3f} s, AG/SI {ag / si:.2f} (M = {len(transforms)})")


if __name__ == "__main__":
    main()
