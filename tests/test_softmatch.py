"""SoftMatch: weights equal the truncated Gaussian of the aligned confidence, statistics and weights against a port
of the official hooks over several steps, and the total against the official form."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_IMAGES as IMAGES
from conftest import make_config, prepared
from ssltrain_plugins.pseudo_labeling import WEAK_LOGITS
from ssltrain_plugins.softmatch import initial_status, truncated_gaussian, update_status


class OfficialHooks:
    """USB hooks/dist_align.py:10-55 (p_target uniform) and softmatch/utils.py:12-77 (per_class off), one process."""

    def __init__(self, num_classes, m, n_sigma):
        self.m, self.n_sigma = m, n_sigma
        self.p_target = torch.ones(num_classes) / num_classes
        self.p_model = None
        self.prob_max_mu_t = torch.tensor(1.0 / num_classes)
        self.prob_max_var_t = torch.tensor(1.0)

    def dist_align(self, probs_x_ulb):
        if self.p_model is None:
            self.p_model = torch.mean(probs_x_ulb, dim=0)
        else:
            self.p_model = self.p_model * self.m + torch.mean(probs_x_ulb, dim=0) * (1 - self.m)
        aligned = probs_x_ulb * (self.p_target + 1e-6) / (self.p_model + 1e-6)
        return aligned / aligned.sum(dim=-1, keepdim=True)

    def masking(self, probs_x_ulb):
        max_probs, _ = probs_x_ulb.max(dim=-1)
        self.prob_max_mu_t = self.m * self.prob_max_mu_t + (1 - self.m) * torch.mean(max_probs).item()
        self.prob_max_var_t = self.m * self.prob_max_var_t + (1 - self.m) * torch.var(max_probs, unbiased=True).item()
        mu, var = self.prob_max_mu_t, self.prob_max_var_t
        return torch.exp(-((torch.clamp(max_probs - mu, max=0.0) ** 2) / (2 * var / (self.n_sigma ** 2))))


def test_weights_are_the_truncated_gaussian():
    p = torch.linspace(0, 1, 101)
    mu, var, n_sigma = torch.tensor(0.6), torch.tensor(0.04), 2.0
    w = truncated_gaussian(p, mu, var, n_sigma)
    std = math.sqrt(0.04) / n_sigma
    expected = torch.where(p >= 0.6, torch.ones_like(p), torch.exp(-(p - 0.6) ** 2 / (2 * std ** 2)))
    torch.testing.assert_close(w, expected)
    assert (w[p >= 0.6] == 1).all() and (w[p < 0.6] < 1).all() and (w > 0).all()
    assert (w[p < 0.6].diff() > 0).all()  # rises towards the mean
    one_std_below = truncated_gaussian(torch.tensor(0.6 - std), mu, var, n_sigma)
    assert one_std_below.item() == pytest.approx(math.exp(-0.5))


def test_statistics_and_weights_match_the_official_hooks_over_steps():
    torch.manual_seed(0)
    c, m = 5, 0.9
    official, status = OfficialHooks(c, m, 2.0), initial_status(c)
    for _ in range(15):
        probs = (torch.randn(48, c) * 2 + torch.tensor([1.0, 0, 0, 0, -1])).softmax(-1)
        expected = official.masking(official.dist_align(probs))
        status, confidence = update_status(status, probs, m, align=True)
        weights = truncated_gaussian(confidence, status.mu, status.var, 2.0)
        torch.testing.assert_close(status.p_model, official.p_model)
        torch.testing.assert_close(status.mu, official.prob_max_mu_t.float())
        torch.testing.assert_close(status.var, official.prob_max_var_t.float(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-6)
    assert 0 < weights.min() < 1 and weights.max() == 1


def test_without_alignment_the_confidence_is_the_raw_max_probability():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    _, confidence = update_status(initial_status(3), probs, 0.9, align=False)
    torch.testing.assert_close(confidence, torch.tensor([0.7, 0.8]))


def test_total_matches_the_official_form_with_unaligned_pseudo_labels():
    config = make_config(*IMAGES, "softmatch.lambda_u=1.5", "softmatch.momentum=0.5", plugins=["softmatch"])
    trainer, batch, ctx, closure = prepared(config)
    result = closure()
    logits_w, logits_s = result.outputs.extras_u[WEAK_LOGITS], result.outputs.logits_u
    official = OfficialHooks(4, 0.5, 2.0)
    weights = official.masking(official.dist_align(logits_w.softmax(-1)))
    assert 0 < weights.min() < 1
    unsup = (F.cross_entropy(logits_s, logits_w.argmax(-1), reduction="none") * weights).mean()
    expected = F.cross_entropy(result.outputs.logits_l, batch.y_l) + 1.5 * unsup
    torch.testing.assert_close(result.total, expected, rtol=1e-4, atol=1e-6)
