"""NS3L: the loss's invariants (methods.md 2g), the threshold check, both modes' wiring, tiny trainings."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_config
from ssltrain import ConfigError
from ssltrain.loop import Trainer
from ssltrain.testing import run_tiny
from ssltrain_plugins.ns3l import check_threshold, negative_mask, ns_loss

IMAGES = ("data.name=synthetic", "data.options={n_train: 64, n_test: 8, shape: [1, 8, 8], num_classes: 4}",
          "model.name=small_cnn", "model.options={width: 4}")


def prepared(config):
    """A Trainer on `config` and its first step's batch (after ssl_modify_batch), ctx and forward."""
    trainer = Trainer(config, "unused")
    ctx, batch = trainer.context(0, is_log=True), trainer.draw(0)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return trainer, batch, ctx, trainer.forward_fn()


def test_no_negatives_gives_exactly_zero():
    logits = torch.randn(8, 5)
    reference = torch.full((8, 5), 0.2)
    assert torch.equal(ns_loss(logits, negative_mask(reference, 0.04)), torch.zeros(8))


def test_loss_is_nonnegative_and_minus_log_of_the_remaining_mass():
    torch.manual_seed(0)
    logits, reference = torch.randn(16, 6), torch.randn(16, 6).softmax(-1)
    negatives = negative_mask(reference, 0.15)
    p = logits.softmax(-1)
    expected = -torch.log((p * ~negatives).sum(-1))
    loss = ns_loss(logits, negatives)
    assert negatives.any() and (loss >= 0).all()
    torch.testing.assert_close(loss, expected)


def test_finite_difference_gradient_is_p_on_negatives_and_nonpositive_elsewhere():
    torch.manual_seed(1)
    z = torch.randn(5)
    negatives = torch.tensor([True, False, True, False, False])
    p, h = z.softmax(-1), 1e-2
    for k in range(5):
        dz = torch.zeros(5)
        dz[k] = h
        fd = (ns_loss((z + dz)[None], negatives[None]) - ns_loss((z - dz)[None], negatives[None])).item() / (2 * h)
        if negatives[k]:
            assert fd == pytest.approx(p[k].item(), abs=1e-3)
        else:
            assert fd <= 1e-4
    zz = z.clone().requires_grad_(True)
    ns_loss(zz[None], negatives[None]).sum().backward()
    torch.testing.assert_close(zz.grad[negatives], p[negatives])


def test_mask_carries_no_gradient():
    torch.manual_seed(2)
    logits = torch.randn(4, 5, requires_grad=True)
    reference = torch.tensor([[0.5, 0.3, 0.1, 0.07, 0.03]] * 4, requires_grad=True)
    shifted = torch.tensor([[0.6, 0.2, 0.11, 0.08, 0.01]] * 4)  # other values, the same set N (< 0.05)
    a = ns_loss(logits, negative_mask(reference, 0.05))
    b = ns_loss(logits, negative_mask(shifted, 0.05))
    assert torch.equal(a, b) and a.sum() > 0
    a.sum().backward()
    assert reference.grad is None and logits.grad.abs().sum() > 0


def test_threshold_below_one_over_c_never_makes_the_argmax_negative():
    torch.manual_seed(3)
    for c in (2, 10, 100):
        probs = torch.distributions.Dirichlet(torch.full((c,), 0.1)).sample((2000,))
        negatives = negative_mask(probs, 0.999 / c)
        assert not negatives.gather(1, probs.argmax(-1, keepdim=True)).any()
        assert (ns_loss(torch.randn(2000, c), negatives) < -math.log(1e-8)).all()  # the clamp never binds
        check_threshold(0.999 / c, c)


def test_threshold_at_or_above_one_over_c_is_a_startup_error():
    with pytest.raises(ConfigError, match=r"ns3l.threshold=0.5 must be below 1/C = 1/2 = 0.5"):
        Trainer(make_config("ns3l.threshold=0.5", plugins=["ns3l"]), "unused")
    with pytest.raises(ConfigError, match=r"threshold=0.3 .* 1/4 = 0.25"):  # C of the run's data (4 classes)
        Trainer(make_config(*IMAGES, "ns3l.threshold=0.3", plugins=["ns3l"]), "unused")


def test_default_threshold_is_point_four_over_c():
    trainer = Trainer(make_config(*IMAGES, plugins=["ns3l"]), "unused")
    assert trainer.pm.get_plugin("ns3l").threshold == pytest.approx(0.1)


def test_alone_thresholds_the_main_forward_and_its_second_forward_leaves_batch_norm_alone():
    trainer, batch, ctx, forward = prepared(make_config(*IMAGES, "ns3l.weight=2", plugins=["ns3l"]))
    view = batch.extras["ns3l/view"]
    assert view.shape == batch.x_u.shape and not torch.equal(view, batch.x_u)
    outputs = trainer.hook.ssl_forward(model=trainer.train_model, batch=batch, ctx=ctx, forward=forward)
    before = {n: b.clone() for n, b in trainer.model.named_buffers()}
    (term,) = trainer.pm.get_plugin("ns3l").ssl_unlabeled_loss(outputs=outputs, batch=batch, ctx=ctx, forward=forward)
    assert all(torch.equal(before[n], b) for n, b in trainer.model.named_buffers())
    assert any(isinstance(m, nn.BatchNorm2d) for m in trainer.model.modules())
    n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
    with torch.no_grad():
        negatives = outputs.logits_u.softmax(-1) < 0.1
        expected = ns_loss(forward(view, update_bn=False)["logits"], negatives)
    assert term.name == "ns3l/unlabeled" and term.weighted and term.per_sample.shape == (n_u,)
    torch.testing.assert_close(term.per_sample, expected)
    assert term.weight == pytest.approx(2 * n_u / n_l)  # official whole-batch average, against a labeled mean


def test_composed_uses_targets_and_the_same_forward_on_every_row():
    config = make_config("ns3l.weight=5", "ns3l.threshold=0.3", "mixmatch.lambda_u=0", plugins=["mixmatch", "ns3l"])
    trainer, batch, ctx, forward = prepared(config)
    assert "ns3l/view" not in batch.extras and batch.y_u is not None and batch.y_l.dim() == 2
    outputs = trainer.hook.ssl_forward(model=trainer.train_model, batch=batch, ctx=ctx, forward=forward)

    def no_forward(x, update_bn=True):
        raise AssertionError("composed NS3L must not run another forward")

    terms = trainer.pm.get_plugin("ns3l").ssl_unlabeled_loss(outputs=outputs, batch=batch, ctx=ctx, forward=no_forward)
    unl, lab = terms
    assert (unl.name, unl.weighted, lab.name, lab.weighted) == ("ns3l/unlabeled", True, "ns3l/labeled", False)
    logits = torch.cat([outputs.logits_l, outputs.logits_u])
    negatives = torch.cat([batch.y_l, batch.y_u]) < 0.3
    assert negatives.any() and not negatives.all(-1).any()
    total = unl.weight * unl.per_sample.mean() + lab.weight * lab.per_sample.mean()
    torch.testing.assert_close(total, 5 * ns_loss(logits, negatives).mean())  # lambda * mean over all rows


@pytest.mark.parametrize("plugins", [["ns3l"], ["vat", "ns3l"], ["mixmatch", "ns3l"], ["mixmatch", "ns3l", "ds3l"]])
def test_tiny_trainings_have_finite_losses(tmp_path, plugins):
    run = run_tiny(tmp_path, plugins, steps=10, overrides=("ns3l.threshold=0.45", "train.log_every=2"))
    values = [v for _, v in run.scalars("ns3l/unlabeled")]
    assert len(values) == 5 and all(math.isfinite(v) for v in values) and max(values) > 0
    assert math.isfinite(run.summary["test_top1"])
