"""Evaluation metrics on hand-checked predictions."""
from __future__ import annotations

import pytest
import torch

from ssltrain.evaluate import evaluate


def test_metrics_on_known_predictions():
    # 4 samples, 2 classes; predicted probabilities for class 1: 0.9, 0.8, 0.3, 0.6
    p1 = torch.tensor([0.9, 0.8, 0.3, 0.6])
    scores = torch.stack([1 - p1, p1], 1).log()
    y = torch.tensor([1, 0, 0, 0])
    m = evaluate(lambda x: scores[x], [(torch.arange(3), y[:3]), (torch.arange(3, 4), y[3:])], 2, y.device)
    assert m["top1"] == pytest.approx(50.0)
    assert m["confusion"] == [[1, 2], [0, 1]]
    assert m["per_class_top1"] == pytest.approx([100 / 3, 100.0])
    # confidences 0.9, 0.8, 0.7, 0.6 in four different bins with correctness 1, 0, 1, 0
    assert m["ece"] == pytest.approx(100 * (0.1 + 0.8 + 0.3 + 0.6) / 4)
    nll = -(torch.tensor([0.9, 0.2, 0.7, 0.4]).log().mean())
    assert m["nll"] == pytest.approx(nll.item(), rel=1e-5)


def test_perfectly_calibrated_confident_predictions():
    y = torch.arange(10) % 3
    scores = torch.nn.functional.one_hot(y, 3).float() * 100
    m = evaluate(lambda x: scores[x], [(torch.arange(10), y)], 3, y.device)
    assert m["top1"] == 100.0 and m["ece"] == pytest.approx(0.0, abs=1e-6)
