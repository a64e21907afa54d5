"""Pseudo-Label: hard labels above the threshold on the same view, the labeled forward alone updates batch-norm
statistics, the warm-up ramp, and the total against the official form (USB pseudolabel.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_IMAGES as IMAGES
from conftest import make_config, prepared
from ssltrain.optim import frozen_bn


def official_total(model, x_l, y_l, x_u, p_cutoff, ramp):
    """USB semilearn/algorithms/pseudolabel/pseudolabel.py:44-77 in PyTorch (Bn_Controller = frozen running stats)."""
    logits_x_lb = model(x_l)
    with frozen_bn(model):
        logits_x_ulb = model(x_u)
    sup_loss = F.cross_entropy(logits_x_lb, y_l)
    probs = logits_x_ulb.detach().softmax(-1)
    mask = probs.max(-1).values.ge(p_cutoff).float()
    unsup_loss = (F.cross_entropy(logits_x_ulb, probs.argmax(-1), reduction="none") * mask).mean()
    return sup_loss + unsup_loss * ramp, mask


def test_total_matches_the_official_form_and_only_the_labeled_forward_updates_bn():
    config = make_config(*IMAGES, "pseudo_label.threshold=0.37", "pseudo_label.warmup=0.5", "train.steps=20",
                         plugins=["pseudo_label"])
    trainer, batch, ctx, _ = prepared(config, step=4)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.make_closure(batch, ctx)()
    after_ours = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.load_state_dict(state)
    official, mask = official_total(trainer.model, batch.x_l, batch.y_l, batch.x_u, 0.37, 4 / 10)
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(result.total, official)
    trainer.model.load_state_dict(state)
    trainer.model(batch.x_l)  # the labeled forward alone
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(after_ours[name], value, rtol=0, atol=0, msg=name)


def test_hard_labels_above_the_threshold_on_the_same_view():
    config = make_config(*IMAGES, "pseudo_label.threshold=0.37", plugins=["pseudo_label"])
    trainer, batch, ctx, closure = prepared(config)
    result = closure()
    (term,) = result.terms
    probs = result.outputs.logits_u.detach().softmax(-1)
    kept = probs.max(-1).values >= 0.37
    expected = F.cross_entropy(result.outputs.logits_u, probs.argmax(-1), reduction="none") * kept
    torch.testing.assert_close(term.per_sample, expected)
    torch.testing.assert_close(result.outputs.y_u, probs)
    (grad,) = torch.autograd.grad(term.per_sample.sum(), result.outputs.logits_u)
    assert grad[~kept].abs().sum() == 0 and grad[kept].abs().sum() > 0


@pytest.mark.parametrize("step, expected", [(0, 0.0), (20, 0.5), (40, 1.0), (90, 1.0)])
def test_lambda_u_ramps_linearly_over_the_warmup_fraction(step, expected):
    config = make_config("train.steps=100", "pseudo_label.lambda_u=2", plugins=["pseudo_label"])
    trainer, batch, ctx, closure = prepared(config, step=step)
    (term,) = closure().terms
    assert term.weight == pytest.approx(2 * expected)
