"""FixMatch: invariants (one forward, mask exactly where max prob >= tau, no gradient through the pseudo-label),
the effective weights against the official loss on a tiny batch, and the compositions (exact resume: test_pseudo_labeling_family)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_IMAGES as IMAGES
from conftest import make_config, prepared
from ssltrain.loop import train
from ssltrain.testing import read_scalars
from ssltrain_plugins.ns3l import negative_mask, ns_loss
from ssltrain_plugins.pseudo_labeling import WEAK, WEAK_LOGITS


def official_fixmatch_total(model, batch, tau, wu):
    """google-research/fixmatch fixmatch.py:99-131 (without the weight decay term) in PyTorch."""
    n = batch.x_l.shape[0]
    logits = model(torch.cat([batch.x_l, batch.extras[WEAK], batch.x_u]))
    logits_x = logits[:n]
    logits_weak, logits_strong = logits[n:].chunk(2)
    loss_xe = F.cross_entropy(logits_x, batch.y_l)
    pseudo_labels = logits_weak.detach().softmax(1)
    loss_xeu = F.cross_entropy(logits_strong, pseudo_labels.argmax(1), reduction="none")
    pseudo_mask = (pseudo_labels.max(1).values >= tau).float()
    return loss_xe + wu * (loss_xeu * pseudo_mask).mean(), pseudo_mask


@pytest.mark.parametrize("extra, tau", [((), 0.52), (IMAGES, 0.4)])
def test_total_loss_equals_the_official_form(extra, tau):
    config = make_config(*extra, f"fixmatch.threshold={tau}", "fixmatch.lambda_u=1.7", plugins=["fixmatch"])
    trainer, batch, ctx, closure = prepared(config)
    torch.manual_seed(5)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = closure()
    trainer.model.load_state_dict(state)  # batch-norm statistics as before the closure's forward
    torch.manual_seed(5)
    official, mask = official_fixmatch_total(trainer.model, batch, tau, 1.7)
    assert 0 < mask.mean() < 1  # some rows kept, some masked: the test sees the mask
    torch.testing.assert_close(result.total, official)
    ratio = result.reduced["fixmatch/unlabeled"] / (official - result.reduced["supervised"])
    assert ratio.item() == pytest.approx(1.0, rel=1e-5)


def test_one_forward_of_labeled_weak_and_strong_rows():
    trainer, batch, ctx, closure = prepared(make_config(*IMAGES, plugins=["fixmatch"]))
    sizes = []
    trainer.model.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    closure()
    assert sizes == [batch.x_l.shape[0] + 2 * batch.x_u.shape[0]]
    assert not torch.equal(batch.extras[WEAK], batch.x_u)  # weak and strong views differ


def test_mask_exactly_where_max_prob_reaches_tau_and_no_gradient_through_the_pseudo_label():
    config = make_config(*IMAGES, "fixmatch.threshold=0.4", plugins=["fixmatch"])
    trainer, batch, ctx, _ = prepared(config)
    forward = trainer.forward_fn()
    outputs = trainer.hook.ssl_forward(model=trainer.train_model, batch=batch, ctx=ctx, forward=forward)
    term = trainer.pm.get_plugin("fixmatch").ssl_unlabeled_loss(outputs=outputs, batch=batch, ctx=ctx)
    probs = outputs.extras_u[WEAK_LOGITS].softmax(-1)
    kept = probs.max(-1).values >= 0.4
    assert kept.any() and not kept.all()
    assert (term.per_sample[~kept] == 0).all() and (term.per_sample[kept] > 0).all()
    assert not outputs.extras_u[WEAK_LOGITS].requires_grad and outputs.y_u is not None
    torch.testing.assert_close(outputs.y_u, probs)
    # the gradient of the term reaches the strong logits only
    weak_logits = outputs.extras_u[WEAK_LOGITS]
    grads = torch.autograd.grad(term.per_sample.sum(), [outputs.logits_u])
    assert grads[0][~kept].abs().sum() == 0 and grads[0][kept].abs().sum() > 0
    assert weak_logits.grad_fn is None


def test_composed_with_ns3l_negatives_come_from_the_pseudo_label_distribution():
    config = make_config(*IMAGES, "ns3l.threshold=0.2", "ns3l.weight=1", plugins=["fixmatch", "ns3l"])
    trainer, batch, ctx, closure = prepared(config)
    calls = []
    trainer.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    result = closure()
    assert calls == [batch.x_l.shape[0] + 2 * batch.x_u.shape[0]]  # NS3L composed: no forward of its own
    outputs = result.outputs
    (unl, lab) = [t for t in result.terms if t.name.startswith("ns3l/")]
    negatives = negative_mask(outputs.y_u, 0.2)
    assert negatives.any() and not negatives.all(-1).any()
    torch.testing.assert_close(unl.per_sample, ns_loss(outputs.logits_u, negatives))


def test_composed_with_ds3l_weights_multiply_the_masked_term():
    config = make_config(*IMAGES, "fixmatch.threshold=0.3", plugins=["fixmatch", "ds3l"])
    trainer, batch, ctx, closure = prepared(config)
    trainer.pm.get_plugin("ds3l")._ensure_meta_net(ctx)
    result = closure()
    (term,) = [t for t in result.terms if t.name == "fixmatch/unlabeled"]
    w = result.weights
    assert w.shape == (batch.x_u.shape[0],) and not torch.allclose(w, torch.ones_like(w))
    torch.testing.assert_close(result.reduced["fixmatch/unlabeled"], term.weight * (w * term.per_sample).mean())


@pytest.mark.parametrize("plugins", [["fixmatch"], ["fixmatch", "ns3l"], ["fixmatch", "ds3l"]])
def test_tiny_trainings_are_finite_and_log_diagnostics(tmp_path, plugins):
    config = make_config("train.steps=6", "train.log_every=2", "fixmatch.threshold=0.6", "ns3l.threshold=0.45",
                         plugins=plugins)
    summary = train(config, tmp_path / "run")
    assert math.isfinite(summary["test_top1"])
    scalars = read_scalars(tmp_path / "run")
    for tag in ("fixmatch/mask_rate", "fixmatch/pseudo_acc_kept_pct", "fixmatch/pseudo_acc_all_pct"):
        values = [v for _, v in scalars.get(tag, [])]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), tag
