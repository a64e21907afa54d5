"""VAT: the power iteration, the KL and entropy terms, batch norm, and a tiny training."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_config
from ssltrain.loop import Trainer
from ssltrain.testing import run_tiny
from ssltrain_plugins.vat import adversarial_perturbation, entropy, kl_div, normalize_rows

IMAGES = ("data.name=synthetic", "data.options={n_train: 64, n_test: 8, shape: [1, 8, 8], num_classes: 4}",
          "model.name=small_cnn", "model.options={width: 4}")


def test_kl_is_nonnegative_and_zero_for_equal_predictions():
    torch.manual_seed(0)
    p, q = torch.randn(32, 5) * 3, torch.randn(32, 5) * 3
    assert (kl_div(p, q) >= 0).all() and kl_div(p, q).sum() > 0
    torch.testing.assert_close(kl_div(p, p), torch.zeros(32))


def test_entropy_is_between_zero_and_log_c():
    h = entropy(torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(h, torch.tensor([math.log(4), 0.0]))


def test_r_adv_has_norm_epsilon_per_row_and_finds_the_sensitive_directions():
    torch.manual_seed(1)
    w = torch.randn(3, 40)  # logits depend on a 3-dim subspace of the 40 input dims
    x = torch.randn(16, 40)
    # xi = 1e-2: logit changes of xi * |w d| ~ 1e-6 (the official xi = 1e-6) are below float32 resolution here
    r = adversarial_perturbation(lambda v: v @ w.T, x, x @ w.T, xi=1e-2, epsilon=2.5)
    torch.testing.assert_close(r.norm(dim=1), torch.full((16,), 2.5))
    rand = 2.5 * normalize_rows(torch.randn_like(x))
    adv_kl, rand_kl = kl_div(x @ w.T, (x + r) @ w.T), kl_div(x @ w.T, (x + rand) @ w.T)
    assert (adv_kl > rand_kl).all()
    in_span = torch.linalg.lstsq(w.T, r.T).solution.T @ w  # the projection of r onto w's row space
    torch.testing.assert_close(in_span, r, atol=1e-3, rtol=1e-3)


def test_images_keep_their_shape_and_zero_sensitivity_gives_zero_perturbation():
    x = torch.randn(4, 1, 8, 8)
    r = adversarial_perturbation(lambda v: v.flatten(1)[:, :3] * 0, x, torch.zeros(4, 3), xi=1e-6, epsilon=1.0)
    assert r.shape == x.shape and torch.equal(r, torch.zeros_like(x))


def test_loss_is_zero_for_a_constant_model():
    config = make_config("vat.entmin_weight=0.1", plugins=["vat"])
    trainer = Trainer(config, "unused")
    ctx, batch = trainer.context(0), trainer.draw(0)
    constant = torch.tensor([0.3, -0.2])

    def forward(x, update_bn=True, autocast=True):
        return {"logits": x[:, :1] * 0 + constant}

    outputs = trainer.hook.ssl_forward(model=trainer.train_model, batch=batch, ctx=ctx, forward=forward)
    kl, ent = trainer.pm.get_plugin("vat").ssl_unlabeled_loss(outputs=outputs, batch=batch, ctx=ctx, forward=forward)
    assert (kl.name, ent.name) == ("vat/kl", "vat/entmin")
    assert torch.equal(kl.per_sample, torch.zeros(batch.x_u.shape[0]))
    assert (ent.per_sample > 0).all()  # a constant non-one-hot prediction has positive entropy


def test_forwards_leave_batch_norm_alone_and_match_the_main_forward_at_r_zero():
    trainer = Trainer(make_config(*IMAGES, "vat.epsilon=1e-6", "vat.weight=2", "vat.rampup_steps=10",
                                  plugins=["vat"]), "unused")
    ctx, batch, forward = trainer.context(10), trainer.draw(0), trainer.forward_fn()
    outputs = trainer.hook.ssl_forward(model=trainer.train_model, batch=batch, ctx=ctx, forward=forward)
    before = {n: b.clone() for n, b in trainer.model.named_buffers()}
    (term,) = trainer.pm.get_plugin("vat").ssl_unlabeled_loss(outputs=outputs, batch=batch, ctx=ctx, forward=forward)
    assert all(torch.equal(before[n], b) for n, b in trainer.model.named_buffers())
    assert all(p.grad is None for p in trainer.model.parameters())  # the power iteration differentiates d only
    n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
    assert term.per_sample.shape == (n_u,) and term.per_sample.max() < 1e-6  # same batch composition as the clean forward
    assert term.weight == pytest.approx(2 * n_u / n_l)  # official whole-batch average, ramp done


def test_tiny_training_has_finite_losses(tmp_path):
    run = run_tiny(tmp_path, ["vat"], steps=10, overrides=("vat.entmin_weight=0.06", "vat.epsilon=1.0",
                                                            "train.log_every=2"))
    for tag in ("vat/kl", "vat/entmin"):
        values = [v for _, v in run.scalars(tag)]
        assert len(values) == 5 and all(math.isfinite(v) for v in values) and max(values) > 0
