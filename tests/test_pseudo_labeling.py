"""The shared pieces of the pseudo-labeling family (plugins/pseudo_labeling.py): views, the one forward, masks,
losses, FlexMatch's learning status against a literal port of the official Counter code, diagnostics, and the
startup checks."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_IMAGES as IMAGES
from conftest import make_config
from ssltrain import ConfigError, SSLBatch
from ssltrain.loop import Trainer
from ssltrain_plugins.pseudo_labeling import (WEAK, WEAK_LOGITS, add_strong_view, class_counts, confidence_mask,
                                              diagnostics, forward_weak_strong, learning_effect, pseudo_label_loss,
                                              select_confident)

def toy_batch(n_l=3, n_u=5, d=4):
    g = torch.Generator().manual_seed(0)
    return SSLBatch(x_l=torch.randn(n_l, d, generator=g), y_l=torch.arange(n_l) % 2, x_u=torch.randn(n_u, d, generator=g),
                    raw_l=torch.zeros(n_l, d), raw_u=torch.randn(n_u, d, generator=g), y_u_hidden=torch.zeros(n_u).long(),
                    idx_u=torch.arange(n_u), idx_l=torch.arange(n_l))


class FakeCtx:
    def augment(self, raw, view):
        assert view == "strong"
        return raw + 100.0


def test_add_strong_view_keeps_the_default_view_as_weak_and_replaces_x_u():
    batch = toy_batch()
    default_view = batch.x_u
    add_strong_view(batch, FakeCtx())
    assert batch.extras[WEAK] is default_view
    torch.testing.assert_close(batch.x_u, batch.raw_u + 100.0)
    assert batch.x_u.shape[0] == batch.y_u_hidden.shape[0] == batch.idx_u.shape[0]


def test_one_forward_split_into_labeled_strong_and_weak_rows():
    batch = toy_batch()
    add_strong_view(batch, FakeCtx())
    linear = torch.nn.Linear(4, 3)
    calls = []

    def forward(x, update_bn=True):
        calls.append(x.shape[0])
        return {"logits": linear(x), "z": x * 2}

    out = forward_weak_strong(batch, forward)
    assert calls == [3 + 5 + 5]  # cat(x_l, weak, strong) in one call
    torch.testing.assert_close(out.logits_l, linear(batch.x_l))
    torch.testing.assert_close(out.logits_u, linear(batch.x_u))
    torch.testing.assert_close(out.extras_u[WEAK_LOGITS], linear(batch.extras[WEAK]))
    torch.testing.assert_close(out.extras_u["z"], batch.x_u * 2)
    torch.testing.assert_close(out.extras_l["z"], batch.x_l * 2)
    assert not out.extras_u[WEAK_LOGITS].requires_grad and out.logits_u.requires_grad
    calls.clear()
    empty = forward_weak_strong(SSLBatch(**{**batch.__dict__, "x_u": batch.x_u[:0]}), forward)
    assert calls == [3] and empty.logits_u.shape == (0, 3) and empty.extras_u[WEAK_LOGITS].shape == (0, 3)


def test_confidence_mask_is_exactly_max_prob_at_or_above_the_threshold():
    probs = torch.tensor([[0.95, 0.05], [0.9499, 0.0501], [0.3, 0.7], [0.5, 0.5]])
    torch.testing.assert_close(confidence_mask(probs, 0.95), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(confidence_mask(probs, 0.5), torch.tensor([1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(confidence_mask(probs, 0.5, strict=True), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    per_row = torch.tensor([0.96, 0.1, 0.7, 0.6])
    torch.testing.assert_close(confidence_mask(probs, per_row), torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_pseudo_label_loss_hard_and_soft_and_no_gradient_into_targets():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.randint(4, (6,))
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1])
    torch.testing.assert_close(pseudo_label_loss(logits, labels, mask), F.cross_entropy(logits, labels, reduction="none") * mask)
    targets = torch.randn(6, 4).softmax(-1).requires_grad_(True)
    soft = pseudo_label_loss(logits, targets, mask)
    torch.testing.assert_close(soft, -(targets * logits.log_softmax(-1)).sum(-1) * mask)
    soft.sum().backward()
    assert targets.grad is None and logits.grad[mask == 0].abs().sum() == 0 and logits.grad.abs().sum() > 0


def official_learning_effect(selected: list[int], num_unlabeled: int, num_classes: int, warmup: bool, previous):
    """USB semilearn/algorithms/flexmatch/utils.py:24-35, literally (Counter over the unlabeled positions)."""
    acc = list(previous)
    pseudo_counter = Counter(selected)
    if max(pseudo_counter.values()) < num_unlabeled:
        if warmup:
            for i in range(num_classes):
                acc[i] = pseudo_counter[i] / max(pseudo_counter.values())
        else:
            wo_negative_one = {k: v for k, v in pseudo_counter.items() if k != -1}
            for i in range(num_classes):
                acc[i] = pseudo_counter[i] / max(wo_negative_one.values())
    return acc


@pytest.mark.parametrize("warmup", [True, False])
def test_learning_effect_matches_the_official_counter_code(warmup):
    torch.manual_seed(1)
    n, c = 40, 3
    selected = torch.full((n,), -1)
    beta = torch.zeros(c)
    for step in range(12):
        idx = torch.randperm(n)[:6]
        probs = (torch.randn(6, c) * 3).softmax(-1)
        selected = select_confident(selected, idx, probs, 0.8)
        expected = official_learning_effect(selected.tolist(), n, c, warmup, beta.tolist())
        beta = learning_effect(selected, n, c, warmup, beta)
        torch.testing.assert_close(beta, torch.tensor(expected))
    assert (selected >= 0).sum() > n // 2 and beta.max() > 0


def test_learning_effect_counts_only_unlabeled_rows_and_keeps_previous_while_nothing_is_selected():
    selected = torch.full((10,), -1)  # 10 dataset rows, 6 of them unlabeled
    previous = torch.tensor([0.3, 0.7])
    torch.testing.assert_close(learning_effect(selected, 6, 2, True, previous), previous)
    selected[[1, 2, 3]] = torch.tensor([0, 0, 1])
    torch.testing.assert_close(class_counts(selected, 2), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(learning_effect(selected, 6, 2, True, previous), torch.tensor([2 / 3, 1 / 3]))  # unused 3
    torch.testing.assert_close(learning_effect(selected, 6, 2, False, previous), torch.tensor([1.0, 0.5]))


def test_select_confident_sets_only_rows_at_or_above_the_fixed_threshold():
    selected = torch.tensor([-1, 2, -1, 1])
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.2, 0.6], [0.05, 0.05, 0.9]])
    out = select_confident(selected, torch.tensor([0, 1, 3]), probs, 0.9)
    assert out.tolist() == [0, 2, -1, 2] and selected.tolist() == [-1, 2, -1, 1]


def test_diagnostics_mask_rate_and_pseudo_label_accuracy_on_kept_and_all_rows():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    hidden = torch.tensor([0, 1, 1, 1, -1])  # the last row: an unseen class (not counted)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    d = diagnostics("m", probs, mask, hidden, torch.tensor([0.5, 0.25]))
    assert d["m/mask_rate"].item() == pytest.approx(0.6)
    assert d["m/pseudo_acc_kept_pct"].item() == pytest.approx(50.0)  # rows 0 (right) and 1 (wrong)
    assert d["m/pseudo_acc_all_pct"].item() == pytest.approx(50.0)  # rows 0 and 2 right of 4
    assert d["m/threshold_c1"].item() == 0.25 and d["m/threshold_max"].item() == 0.5
    soft = diagnostics("m", probs, torch.tensor([1.0, 0.5, 0.5, 0.0, 0.0]), hidden)
    assert soft["m/pseudo_acc_kept_pct"].item() == pytest.approx(100 * 1.5 / 2.0)  # weighted by the mask


@pytest.mark.parametrize("plugin", ["fixmatch", "flexmatch", "freematch", "softmatch", "uda"])
def test_a_strong_view_on_vectors_without_strong_noise_is_a_startup_error(plugin):
    with pytest.raises(ConfigError, match=r"data.augment.strong_noise_std=0.0.*set data.augment.strong_noise_std"):
        Trainer(make_config("data.augment.strong_noise_std=0", plugins=[plugin]), "unused")
    with pytest.raises(ConfigError, match=r"data.augment.num_ops=0 and data.augment.cutout=0"):
        Trainer(make_config(*IMAGES, "data.augment.num_ops=0", "data.augment.cutout=0", plugins=[plugin]), "unused")
    Trainer(make_config(*IMAGES, "data.augment.num_ops=0", plugins=[plugin]), "unused")  # cutout alone is strong


@pytest.mark.parametrize("plugin", ["fixmatch", "flexmatch", "freematch", "softmatch", "uda", "pseudo_label"])
def test_an_unlabeled_batch_that_is_not_a_multiple_of_the_labeled_batch_is_a_startup_error(plugin):
    with pytest.raises(ConfigError, match=r"data.unlabeled_batch_size=40 is not a multiple of data.batch_size=16; "
                                          r"set data.unlabeled_batch_size=32 \(uratio 2\)"):
        Trainer(make_config("data.unlabeled_batch_size=40", plugins=[plugin]), "unused")
    Trainer(make_config("data.unlabeled_batch_size=48", plugins=[plugin]), "unused")  # uratio 3


@pytest.mark.parametrize("plugins", [["fixmatch", "flexmatch"], ["freematch", "fixmatch"], ["fixmatch", "mixmatch"],
                                     ["uda", "pseudo_label"], ["mixmatch", "softmatch"]])
def test_two_label_guessers_fail_at_startup_naming_both(plugins):
    a, b = plugins
    with pytest.raises(ConfigError, match=rf"plugins '({a}|{b})' and '({a}|{b})' cannot run together: both guess "
                                          rf"labels .*two label guessers.*remove one of them"):
        Trainer(make_config(plugins=plugins), "unused")


@pytest.mark.parametrize("key", ["fixmatch.threshold", "flexmatch.threshold", "uda.threshold", "pseudo_label.threshold"])
@pytest.mark.parametrize("value", [0, 1.5, -0.2])
def test_thresholds_outside_the_unit_interval_are_config_errors_naming_key_and_value(key, value):
    with pytest.raises(ConfigError, match=rf"{key}: Input should be .* (0|1).*\(got {value}\)"):
        make_config(f"{key}={value}", plugins=[key.split(".")[0]])
