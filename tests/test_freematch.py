"""FreeMatch: the global threshold tracks the EMA of confidence, the self-adaptive thresholds, mask and fairness
term against a port of the official hook and entropy_loss, and the total against the official form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_IMAGES as IMAGES
from conftest import make_config, prepared
from ssltrain_plugins.freematch import (Status, fairness_loss, initial_status, self_adaptive_thresholds,
                                        update_status)
from ssltrain_plugins.pseudo_labeling import WEAK_LOGITS


class OfficialHook:
    """USB semilearn/algorithms/freematch/utils.py:14-66 (one process, use_quantile and clip_thresh off)."""

    def __init__(self, num_classes, m):
        self.m = m
        self.p_model = torch.ones(num_classes) / num_classes
        self.label_hist = torch.ones(num_classes) / num_classes
        self.time_p = self.p_model.mean()

    def masking(self, logits_x_ulb):
        probs_x_ulb = torch.softmax(logits_x_ulb.detach(), dim=-1)
        max_probs, max_idx = torch.max(probs_x_ulb, dim=-1, keepdim=True)
        self.time_p = self.time_p * self.m + (1 - self.m) * max_probs.mean()
        self.p_model = self.p_model * self.m + (1 - self.m) * probs_x_ulb.mean(dim=0)
        hist = torch.bincount(max_idx.reshape(-1), minlength=self.p_model.shape[0]).to(self.p_model.dtype)
        self.label_hist = self.label_hist * self.m + (1 - self.m) * (hist / hist.sum())
        max_probs, max_idx = probs_x_ulb.max(dim=-1)
        mod = self.p_model / torch.max(self.p_model, dim=-1)[0]
        return max_probs.ge(self.time_p * mod[max_idx]).to(max_probs.dtype)


def official_entropy_loss(mask, logits_s, prob_model, label_hist):
    """USB semilearn/algorithms/freematch/freematch.py:16-44."""
    def replace_inf_to_zero(val):
        val[val == float("inf")] = 0.0
        return val
    mask = mask.bool()
    logits_s = logits_s[mask]
    prob_s = logits_s.softmax(dim=-1)
    _, pred_label_s = torch.max(prob_s, dim=-1)
    hist_s = torch.bincount(pred_label_s, minlength=logits_s.shape[1]).to(logits_s.dtype)
    hist_s = hist_s / hist_s.sum()
    prob_model = prob_model.reshape(1, -1)
    label_hist = label_hist.reshape(1, -1)
    prob_model_scaler = replace_inf_to_zero(1 / label_hist).detach()
    mod_prob_model = prob_model * prob_model_scaler
    mod_prob_model = mod_prob_model / mod_prob_model.sum(dim=-1, keepdim=True)
    mean_prob_scaler_s = replace_inf_to_zero(1 / hist_s).detach()
    mod_mean_prob_s = prob_s.mean(dim=0, keepdim=True) * mean_prob_scaler_s
    mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum(dim=-1, keepdim=True)
    loss = mod_prob_model * torch.log(mod_mean_prob_s + 1e-12)
    return loss.sum(dim=1).mean()


def test_global_threshold_tracks_the_ema_of_the_confidence():
    torch.manual_seed(0)
    m, c = 0.9, 5
    status = initial_status(c)
    assert status.tau.item() == pytest.approx(1 / c)
    probs = (torch.randn(64, c) * 2).softmax(-1)  # the same batch every step: tau -> its mean confidence
    confidence = probs.max(-1).values.mean()
    for k in range(1, 30):
        status = update_status(status, probs, m)
        expected = m ** k / c + (1 - m ** k) * confidence
        assert status.tau.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(status.p_model.sum(), torch.tensor(1.0))
    thresholds = self_adaptive_thresholds(status)
    assert thresholds.max().item() == pytest.approx(status.tau.item())  # the most expected class gets tau_t


def test_statistics_and_mask_match_the_official_hook_over_steps():
    torch.manual_seed(1)
    hook, status = OfficialHook(4, 0.99), initial_status(4)
    for _ in range(20):
        logits = torch.randn(32, 4) * 3
        official_mask = hook.masking(logits)
        status = update_status(status, logits.softmax(-1), 0.99)
        thresholds = self_adaptive_thresholds(status)
        probs = logits.softmax(-1)
        mask = (probs.max(-1).values >= thresholds[probs.argmax(-1)]).float()
        torch.testing.assert_close(mask, official_mask)
        torch.testing.assert_close(status.tau, hook.time_p)
        torch.testing.assert_close(status.p_model, hook.p_model)
        torch.testing.assert_close(status.label_hist, hook.label_hist)


def test_fairness_term_matches_the_official_entropy_loss_and_its_gradient():
    torch.manual_seed(2)
    status = Status(torch.tensor(0.7), torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([0.5, 0.0, 0.3, 0.2]))
    logits = (torch.randn(24, 4) * 2).requires_grad_(True)
    mask = (torch.rand(24) > 0.4).float()
    ours = fairness_loss(logits, mask, status)
    (g_ours,) = torch.autograd.grad(ours, logits)
    official = official_entropy_loss(mask, logits, status.p_model.clone(), status.label_hist.clone())
    (g_official,) = torch.autograd.grad(official, logits)
    torch.testing.assert_close(ours, official)
    torch.testing.assert_close(g_ours, g_official)
    none_kept = fairness_loss(logits, torch.zeros(24), status)
    (g_none,) = torch.autograd.grad(none_kept, logits)
    assert none_kept.item() == 0 and torch.isfinite(g_none).all() and g_none.abs().sum() == 0


def test_total_matches_the_official_form():
    config = make_config(*IMAGES, "freematch.lambda_u=1.5", "freematch.lambda_f=0.3", "freematch.momentum=0.5",
                         plugins=["freematch"])
    trainer, batch, ctx, closure = prepared(config)
    start = Status(torch.tensor(0.4), torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    trainer.pm.get_plugin("freematch").status = start
    result = closure()
    logits_w, logits_s = result.outputs.extras_u[WEAK_LOGITS], result.outputs.logits_u
    hook = OfficialHook(4, 0.5)
    hook.time_p, hook.p_model, hook.label_hist = start
    mask = hook.masking(logits_w)
    assert 0 < mask.mean() < 1
    unsup = (F.cross_entropy(logits_s, logits_w.argmax(-1), reduction="none") * mask).mean()
    fair = official_entropy_loss(mask, logits_s, hook.p_model, hook.label_hist)
    official = F.cross_entropy(result.outputs.logits_l, batch.y_l) + 1.5 * unsup + 0.3 * fair
    torch.testing.assert_close(result.total, official)
