"""UDA: TSA schedule bounds, the annealed supervised mean, the sharpened targets with the strict confidence mask,
and the total against the official form (google-research/uda image/main.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_IMAGES as IMAGES
from conftest import make_config, prepared
from ssltrain_plugins.pseudo_labeling import WEAK_LOGITS
from ssltrain_plugins.uda import annealed, tsa_threshold


@pytest.mark.parametrize("c", [2, 10])
def test_tsa_schedules_rise_from_one_over_c_to_one(c):
    grid = [k / 100 for k in range(101)]
    for schedule in ("linear", "exp", "log"):
        values = [tsa_threshold(schedule, t, c) for t in grid]
        assert all(b >= a for a, b in zip(values, values[1:])), schedule
        assert all(1 / c - 1e-12 <= v <= 1 + 1e-12 for v in values), schedule
    assert tsa_threshold("linear", 0, c) == pytest.approx(1 / c) and tsa_threshold("linear", 1, c) == pytest.approx(1)
    assert tsa_threshold("exp", 0, c) == pytest.approx(math.exp(-5) * (1 - 1 / c) + 1 / c)
    assert tsa_threshold("exp", 1, c) == pytest.approx(1)
    assert tsa_threshold("log", 0, c) == pytest.approx(1 / c)
    assert tsa_threshold("log", 1, c) == pytest.approx((1 - math.exp(-5)) * (1 - 1 / c) + 1 / c)
    assert tsa_threshold("exp", 0.5, c) < tsa_threshold("linear", 0.5, c) < tsa_threshold("log", 0.5, c)
    assert tsa_threshold("none", 0.3, c) == 1


def test_annealed_mean_is_the_official_average_over_kept_rows():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    p_label = torch.tensor([0.2, 0.9, 0.5, 0.7])
    out = annealed(loss, p_label, 0.6)  # rows 1 and 3 are above the threshold: dropped
    assert out.mean().item() == pytest.approx((1.0 + 3.0) / 2)
    assert annealed(loss, p_label, 0.1).mean().item() == 0  # every row dropped: sum 0 / max(0, 1)
    assert annealed(loss, p_label, 1.0).mean().item() == pytest.approx(loss.mean().item())


def official_uda_total(logits_l, y_l, logits_ori, logits_aug, T, thresh, tsa_eta=None):
    """google-research/uda image/main.py:270-287 (TSA) and 334-385 (the unlabeled term) in PyTorch."""
    sup_loss = F.cross_entropy(logits_l, y_l, reduction="none")
    if tsa_eta is not None:
        correct_label_probs = (F.one_hot(y_l, logits_l.shape[1]) * logits_l.softmax(-1)).sum(-1)
        loss_mask = 1 - (correct_label_probs > tsa_eta).float()
        avg_sup_loss = (sup_loss * loss_mask).sum() / torch.clamp(loss_mask.sum(), min=1)
    else:
        avg_sup_loss = sup_loss.mean()
    tgt = (logits_ori / T).detach()
    aug_loss = (tgt.softmax(-1) * (tgt.log_softmax(-1) - logits_aug.log_softmax(-1))).sum(-1)
    loss_mask = (logits_ori.softmax(-1).max(-1).values > thresh).float()
    return avg_sup_loss + (aug_loss * loss_mask).mean(), loss_mask


@pytest.mark.parametrize("tsa", ["none", "linear"])
def test_total_matches_the_official_form(tsa):
    config = make_config(*IMAGES, "uda.threshold=0.37", "uda.T=0.4", f"uda.tsa={tsa}", plugins=["uda"])
    trainer, batch, ctx, _ = prepared(config, step=7)
    closure = trainer.make_closure(batch, ctx)
    result = closure()
    logits_w, logits_s = result.outputs.extras_u[WEAK_LOGITS], result.outputs.logits_u
    eta = tsa_threshold("linear", 7 / ctx.total_steps, 4) if tsa == "linear" else None
    official, mask = official_uda_total(result.outputs.logits_l, batch.y_l, logits_w, logits_s, 0.4, 0.37, eta)
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(result.total, official)
    torch.testing.assert_close(result.outputs.y_u, (logits_w / 0.4).softmax(-1))  # the sharpened targets


def test_tsa_drops_confident_labeled_rows(tmp_path):
    config = make_config(*IMAGES, "uda.tsa=linear", plugins=["uda"])
    trainer, batch, ctx, closure = prepared(config, step=0)
    result = closure()  # eta = 1/C = 0.25 at step 0: labeled rows above 0.25 on their label are dropped
    p_label = result.outputs.logits_l.softmax(-1).gather(1, batch.y_l.view(-1, 1)).squeeze(1)
    dropped = p_label > 0.25
    assert dropped.any() and not dropped.all()
    assert (result.supervised[dropped] == 0).all() and (result.supervised[~dropped] > 0).all()
