"""FlexMatch: thresholds warm up and rise with a class's learning status, the mask and loss against the official
consistency_loss, the state moves once per step (also under DS3L's extra closures)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_IMAGES as IMAGES
from conftest import make_config, prepared
from ssltrain_plugins.flexmatch import flexible_thresholds
from ssltrain_plugins.pseudo_labeling import WEAK_LOGITS, learning_effect


def test_convex_mapping_of_the_learning_effect():
    beta = torch.linspace(0, 1, 11)
    t = flexible_thresholds(beta, 0.95)
    assert t[0] == 0 and t[-1].item() == pytest.approx(0.95)
    assert (t.diff() > 0).all() and (t.diff().diff() > 0).all()  # increasing and convex
    assert (t <= 0.95 * beta + 1e-7).all()


def test_thresholds_warm_up_while_most_samples_are_unused_and_rise_with_a_class_status():
    n, c = 1000, 3
    selected = torch.full((n,), -1)
    beta = torch.zeros(c)
    history = []
    for k in range(1, 6):  # class 0 gains 100 confident samples per round, class 1 gains 20, class 2 none
        selected[(k - 1) * 100:k * 100] = 0
        selected[800 + (k - 1) * 20:800 + k * 20] = 1
        beta = learning_effect(selected, n, c, True, beta)
        history.append(flexible_thresholds(beta, 0.95))
    first, last = history[0], history[-1]
    assert first[0] < 0.95 * 0.1  # warm-up: 100 of 1000 selected, beta_0 = 100 / 880
    assert last[0] > first[0] and last[1] > first[1] and last[2] == first[2] == 0  # rise with the status
    assert (torch.stack(history)[:, 0].diff() > 0).all() and last[0] > last[1] > last[2]
    without_warmup = flexible_thresholds(learning_effect(selected, n, c, False, torch.zeros(c)), 0.95)
    assert without_warmup[0].item() == pytest.approx(0.95)  # the best class is at tau at once without warm-up
    assert (without_warmup > last).all() | (without_warmup[2] == 0)


def official_flexmatch_loss(logits_s, logits_w, class_acc, p_cutoff):
    """TorchSSL models/flexmatch/flexmatch_utils.py:31-52 (hard labels, no DA) in plain PyTorch."""
    pseudo_label = torch.softmax(logits_w.detach(), dim=-1)
    max_probs, max_idx = torch.max(pseudo_label, dim=-1)
    mask = max_probs.ge(p_cutoff * (class_acc[max_idx] / (2. - class_acc[max_idx]))).float()
    select = max_probs.ge(p_cutoff).long()
    masked_loss = F.cross_entropy(logits_s, max_idx, reduction="none") * mask
    return masked_loss.mean(), mask, select, max_idx


def test_mask_loss_and_selection_match_the_official_code():
    config = make_config(*IMAGES, "flexmatch.threshold=0.37", "flexmatch.lambda_u=1.3", plugins=["flexmatch"])
    trainer, batch, ctx, closure = prepared(config)
    plugin = trainer.pm.get_plugin("flexmatch")
    beta = torch.tensor([1.0, 0.9, 0.5, 0.2])  # a learning status with different thresholds per class
    plugin.status = plugin.status._replace(learning_effect=beta)
    result = closure()
    logits_w, logits_s = result.outputs.extras_u[WEAK_LOGITS], result.outputs.logits_u
    official, mask, select, max_idx = official_flexmatch_loss(logits_s, logits_w, beta, 0.37)
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(result.reduced["flexmatch/unlabeled"], 1.3 * official)
    before = plugin.status.selected.clone()
    plugin.ssl_step_end(result=type("R", (), {"loss": result})(), batch=batch)
    expected = before.clone()
    expected[batch.idx_u[select == 1]] = max_idx[select == 1]
    assert torch.equal(plugin.status.selected, expected) and (expected >= 0).sum() == select.sum()


def test_state_moves_once_per_step_under_ds3l(tmp_path):
    from ssltrain.loop import train
    steps = 3
    config = make_config(f"train.steps={steps}", "flexmatch.threshold=0.55", plugins=["flexmatch", "ds3l"])
    calls = []
    from ssltrain_plugins import flexmatch
    original = flexmatch.select_confident

    def counting(*args):
        calls.append(1)
        return original(*args)

    flexmatch.select_confident = counting
    try:
        train(config, tmp_path / "run")
    finally:
        flexmatch.select_confident = original
    assert len(calls) == steps
