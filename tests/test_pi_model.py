"""Pi-model: the consistency term's math and its wiring."""
from __future__ import annotations

import torch

from conftest import make_config
from ssltrain.loop import Trainer
from ssltrain_plugins.pi_model import consistency_mse


def test_consistency_is_zero_for_equal_predictions_and_bounded():
    logits = torch.randn(6, 5)
    assert torch.equal(consistency_mse(logits, logits), torch.zeros(6))
    far = consistency_mse(torch.tensor([[100.0, 0.0]]), torch.tensor([[0.0, 100.0]]))
    torch.testing.assert_close(far, torch.tensor([1.0]))  # (1/C) * ||e1 - e2||^2 = 2 / 2


def test_no_gradient_reaches_the_target():
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    consistency_mse(a, b).sum().backward()
    assert b.grad is None and a.grad.abs().sum() > 0


def test_term_is_per_sample_ramped_and_second_view_leaves_bn_alone(tmp_path):
    config = make_config("pi_model.rampup_steps=10", "pi_model.weight=4", plugins=["pi_model"])
    trainer = Trainer(config, tmp_path)
    for step, ramp in [(0, torch.exp(torch.tensor(-5.0)).item()), (10, 1.0)]:
        ctx = trainer.context(step)
        batch = trainer.draw(step)
        trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
        view2 = batch.extras["pi_model/view2"]
        assert view2.shape == batch.x_u.shape and not torch.equal(view2, batch.x_u)
        loss = trainer.make_closure(batch, ctx)()
        (term,) = loss.terms
        assert term.name == "pi_model/consistency" and term.per_sample.shape == (32,)
        assert abs(float(term.weight) - 4 * ramp) < 1e-6
