"""MixMatch: the invariants of methods.md section 1g on random tensors, the batch-norm handling,
and short trainings on tiny two-moons data (finite losses, exact checkpoint resume)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ssltrain import ConfigError, SSLPlugin, checkpoint, hookimpl
from ssltrain.config import OptimConfig
from ssltrain.loop import Trainer, train
from ssltrain.optim import EMA, build_optimizer
from ssltrain.plugins import discover
from ssltrain_plugins.mixmatch import (MixMatch, align_distribution, guess_labels, interleave, interleave_offsets,
                                       l2_per_row, mix_weights, mixup, sharpen)

from conftest import make_config


def entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


# --- sharpening and label guessing ----------------------------------------------------------------

def test_sharpen_identity_normalised_and_order_preserving():
    p = torch.rand(50, 10).softmax(-1)
    torch.testing.assert_close(sharpen(p, 1.0), p)
    for T in (0.9, 0.5, 0.2):
        s = sharpen(p, T)
        torch.testing.assert_close(s.sum(-1), torch.ones(50))
        assert torch.equal(s.argsort(-1), p.argsort(-1))
        assert (entropy(s) <= entropy(p) + 1e-6).all()
    assert sharpen(torch.tensor([0.5, 0.3, 0.2]), 0.05).max() > 0.9999


def test_guessed_labels_carry_no_gradient():
    logits = torch.randn(2, 8, 5, requires_grad=True)
    q = guess_labels(list(logits.softmax(-1)), 0.5)
    assert q.shape == (8, 5) and q.requires_grad is False
    torch.testing.assert_close(q, sharpen(logits.detach().softmax(-1).mean(0), 0.5))


# --- MixUp --------------------------------------------------------------------------------------

def test_mix_weights_at_least_half():
    lam = mix_weights(10_000, 0.75)
    assert lam.shape == (10_000,) and (lam >= 0.5).all() and (lam <= 1).all()
    assert lam.std() > 0.05  # per-row draws, not one lambda for the batch


def test_mixup_stays_closer_to_its_own_row_and_keeps_distributions():
    n = 64
    x, p = torch.randn(n, 3, 4, 4), torch.rand(n, 10).softmax(-1)
    lam, perm = mix_weights(n, 0.75), torch.randperm(n)
    xm, pm = mixup(x, p, lam, perm)
    d_own = (xm - x).flatten(1).norm(dim=1)
    d_partner = (xm - x[perm]).flatten(1).norm(dim=1)
    assert (d_own <= d_partner + 1e-5).all()
    torch.testing.assert_close(pm.sum(-1), torch.ones(n))
    torch.testing.assert_close(xm[0], lam[0] * x[0] + (1 - lam[0]) * x[perm[0]])
    same_x, same_p = mixup(x, p, lam, torch.arange(n))  # MixUp(a, a) == a
    torch.testing.assert_close(same_x, x)
    torch.testing.assert_close(same_p, p)


# --- interleave ---------------------------------------------------------------------------------

def test_interleave_offsets_and_involution():
    assert interleave_offsets(64, 2) == [0, 21, 42, 64]
    assert interleave_offsets(16, 3) == [0, 4, 8, 12, 16]
    xs = [torch.randn(64, 3) for _ in range(3)]
    mixed = interleave(xs, 64)
    assert all(m.shape == (64, 3) for m in mixed)
    assert torch.equal(mixed[0][:21], xs[0][:21]) and torch.equal(mixed[0][21:42], xs[1][21:42])
    assert torch.equal(mixed[1][21:42], xs[0][21:42]) and torch.equal(mixed[2][42:], xs[0][42:])
    for a, b in zip(interleave(mixed, 64), xs):
        assert torch.equal(a, b)


def test_interleaved_forward_returns_rows_in_order_and_updates_bn_once():
    b, k = 64, 2
    plugin = MixMatch(MixMatch.Config(K=k))
    x_l, x_u = torch.randn(b, 5), torch.randn(k * b, 5)
    batch = type("B", (), {"x_l": x_l, "x_u": x_u})()
    calls = []

    def identity(x, update_bn=True):
        calls.append(update_bn)
        return {"logits": x.clone(), "z": 2 * x}

    out = plugin.ssl_forward(batch=batch, forward=identity)
    assert calls == [True, False, False]
    assert torch.equal(out.logits_l, x_l) and torch.equal(out.logits_u, x_u)
    assert torch.equal(out.extras_l["z"], 2 * x_l) and torch.equal(out.extras_u["z"], 2 * x_u)
    assert MixMatch(MixMatch.Config(bn_mode="concat")).ssl_forward(batch=batch, forward=identity) is None


# --- the unlabeled loss and its ramp ------------------------------------------------------------

def test_l2_zero_at_target_and_bounded():
    logits = torch.randn(32, 10)
    assert l2_per_row(logits, logits.softmax(-1)).abs().max() < 1e-7
    targets = torch.rand(32, 10).softmax(-1)
    loss = l2_per_row(5 * logits, targets)
    assert loss.shape == (32,) and (loss >= 0).all() and (loss <= 2 / 10).all()
    wrong = nn.functional.one_hot(torch.zeros(1, dtype=torch.long), 10).float()
    assert l2_per_row(torch.tensor([[0.0] * 9 + [100.0]]), wrong).item() == pytest.approx(2 / 10)


def test_lambda_u_ramps_linearly_in_steps():
    plugin = MixMatch(MixMatch.Config(lambda_u=75, rampup_steps=16384))
    outputs = type("O", (), {"logits_u": torch.zeros(4, 3)})()
    batch = type("B", (), {"y_u": torch.full((4, 3), 1 / 3)})()
    weights = [plugin.ssl_unlabeled_loss(outputs=outputs, batch=batch, ctx=type("C", (), {"step": t})()).weight
               for t in (0, 8192, 16384, 50000)]
    assert weights == [0.0, 37.5, 75.0, 75.0]


# --- optimiser invariants: EMA and decoupled weight decay ------------------------------------------

def small_bn_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_ema_update():
    model = small_bn_net()
    ema = EMA(model, 0.999)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update()
    for e, old, p in zip(ema.module.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.999 * old + 0.001 * p)


def test_one_decay_step_scales_kernels_only():
    model = small_bn_net()
    lr, wd = 0.002, 0.02
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=lr, weight_decay=wd), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own update is then exactly zero: only the decay acts
    opt.step()
    for name, p in model.named_parameters():
        expect = before[name] * (1 - wd * lr) if p.ndim > 1 else before[name]
        assert torch.equal(p.detach(), expect), name
    assert {n for n, p in model.named_parameters() if p.ndim > 1} == {"0.weight", "3.weight"}


# --- the plugin inside the trainer ------------------------------------------------------------------

class BNNet(SSLPlugin):
    """Owns a two-moons model with batch norm (the built-in MLP has none)."""

    @hookimpl
    def ssl_build_model(self, num_classes, input_shape):
        return nn.Sequential(nn.Linear(input_shape[0], 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))


def mixmatch_trainer(tmp_path, *overrides, extra=None, **sections):
    extra = extra or {}
    config = make_config("mixmatch.rampup_steps=10", *overrides, classes=extra,
                         plugins=[*sections.pop("plugins", ["mixmatch"]), *extra], **sections)
    return Trainer(config, tmp_path, {**discover(), **extra})


def modified_batch(trainer, step=0):
    ctx = trainer.context(step, is_log=True)
    batch = trainer.draw(step)
    raw = (batch.x_l.clone(), batch.y_l.clone(), batch.y_u_hidden.clone(), batch.idx_u.clone())
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return batch, ctx, raw


def test_modify_batch_shapes_targets_and_frozen_bn_while_guessing(tmp_path):
    trainer = mixmatch_trainer(tmp_path, extra={"bnnet": BNNet})
    bn = trainer.model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    batch, ctx, (x_l, y_l, y_hidden, idx_u) = modified_batch(trainer)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    b, b_u = x_l.shape[0], y_hidden.shape[0]
    assert batch.x_l.shape == (b, 2) and batch.y_l.shape == (b, 2)
    assert batch.x_u.shape == (2 * b_u, 2) and batch.y_u.shape == (2 * b_u, 2)
    torch.testing.assert_close(batch.y_l.sum(-1), torch.ones(b))
    torch.testing.assert_close(batch.y_u.sum(-1), torch.ones(2 * b_u))
    assert torch.equal(batch.y_u_hidden, y_hidden.repeat(2)) and torch.equal(batch.idx_u, idx_u.repeat(2))
    assert not batch.y_u.requires_grad and batch.extras["mixmatch/pseudo_labels"].shape == (b_u, 2)
    assert batch.extras["mixmatch/views"].shape == (2 * b_u, 2)
    share = trainer.pm.get_plugin("mixmatch").diagnostics["mixmatch/guess_min_class_share"]
    torch.testing.assert_close(share, batch.extras["mixmatch/pseudo_labels"].mean(0).min() * 2)
    assert 0 <= share <= 1
    # each mixed labeled target keeps at least half of its own one-hot label
    own = batch.y_l.gather(1, y_l[:, None]).squeeze(1)
    assert (own >= 0.5 - 1e-6).all()


def test_interleave_updates_bn_from_the_first_chunk_only(tmp_path):
    trainer = mixmatch_trainer(tmp_path, extra={"bnnet": BNNet})
    batch, ctx, _ = modified_batch(trainer)
    reference = copy.deepcopy(trainer.model)
    b = batch.x_l.shape[0]
    first_chunk = interleave([batch.x_l, *batch.x_u.split(b)], b)[0]
    loss = trainer.make_closure(batch, ctx)()
    reference(first_chunk)
    for mine, ref in zip(trainer.model[1].buffers(), reference[1].buffers()):
        torch.testing.assert_close(mine, ref)
    assert loss.outputs.logits_u.shape == (batch.x_u.shape[0], 2) and torch.isfinite(loss.total)
    assert set(loss.reduced) == {"supervised", "mixmatch/l2"}


def test_configure_rejects_bad_settings(tmp_path):
    class Sla(SSLPlugin):
        pass

    with pytest.raises(ConfigError, match="plugins 'mixmatch' and 'sla' cannot run together: .*N-class targets"):
        mixmatch_trainer(tmp_path, extra={"sla": Sla})
    with pytest.raises(ConfigError, match="multiple of data.batch_size"):
        mixmatch_trainer(tmp_path, "data.batch_size=24")
    mixmatch_trainer(tmp_path / "concat", "data.batch_size=24", "mixmatch.bn_mode=concat")
    for bad in ("mixmatch.K=0", "mixmatch.T=0", "mixmatch.T=1.5", "mixmatch.alpha=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            make_config(bad, plugins=["mixmatch"])


@pytest.mark.parametrize("bn_mode", ["interleave", "concat"])
def test_trains_with_finite_losses(tmp_path, bn_mode):
    extra = {"bnnet": BNNet}
    config = make_config("train.steps=12", "mixmatch.rampup_steps=4", f"mixmatch.bn_mode={bn_mode}",
                         classes=extra, plugins=["mixmatch", "bnnet"])
    summary = train(config, tmp_path / "run", classes={**discover(), **extra})
    assert summary["steps"] == 12 and math.isfinite(summary["test_top1"])
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "nan" not in metrics.lower()


def test_distribution_alignment_maps_the_model_marginal_to_the_target():
    p_model, p_target = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    q = torch.softmax(torch.randn(8, 3), -1)
    torch.testing.assert_close(align_distribution(q, p_target, p_target), q)  # aligned model: identity
    torch.testing.assert_close(align_distribution(p_model[None], p_model, p_target)[0], p_target)
    aligned = align_distribution(q, p_model, p_target)
    torch.testing.assert_close(aligned.sum(-1), torch.ones(8))
    assert (aligned[:, 0] < q[:, 0]).all() and (aligned[:, 2] > q[:, 2]).all()  # over-predicted class loses mass


def test_distribution_alignment_tracks_marginals_and_stays_off_by_default(tmp_path):
    plain = mixmatch_trainer(tmp_path / "plain")
    modified_batch(plain)
    assert plain.pm.get_plugin("mixmatch").p_model is None  # faithful MixMatch: no alignment state
    trainer = mixmatch_trainer(tmp_path / "da", "mixmatch.distribution_alignment=true", "mixmatch.alignment_momentum=0.5")
    plugin = trainer.pm.get_plugin("mixmatch")
    batch, ctx, (_, y_l, _, _) = modified_batch(trainer)
    torch.testing.assert_close(plugin.label_counts, torch.bincount(y_l, minlength=2).float())
    assert plugin.p_model.shape == (2,) and torch.isclose(plugin.p_model.sum(), torch.tensor(1.0))
    assert not torch.equal(plugin.p_model, torch.full((2,), 0.5))  # moved halfway to the batch's mean guess
    torch.testing.assert_close(batch.y_u.sum(-1), torch.ones(batch.y_u.shape[0]))


@pytest.mark.parametrize("alignment", [False, True])
def test_checkpoint_resume_is_exact(tmp_path, alignment):
    base = ["mixmatch.rampup_steps=4", "train.eval_every=5", f"mixmatch.distribution_alignment={alignment}"]
    straight = make_config("train.steps=10", *base, plugins=["mixmatch"])
    train(straight, tmp_path / "straight")
    train(make_config("train.steps=5", *base, plugins=["mixmatch"]), tmp_path / "resumed")
    train(straight, tmp_path / "resumed", resume=True)
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 10
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
