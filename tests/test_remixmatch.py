"""ReMixMatch: rotations and the rotation head, distribution alignment, augmentation anchoring (the weak
guess is every view's target), batch norm, bf16, bad settings and exact resume (the losses against the
official total: test_fidelity.py). Images are tiny synthetic ones (1 x 8 x 8) on a width-4 small CNN."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import ssltrain_plugins.mixmatch as mixmatch_module
from ssltrain import ConfigError
from ssltrain.loop import Trainer
from ssltrain.models import build_backbone
from ssltrain.plugins import discover
from ssltrain_plugins.mixmatch import DistributionAlignment, sharpen
from ssltrain_plugins.remixmatch import RotationHead, rotate_quarters, soft_cross_entropy

from conftest import make_config

IMAGES = ("data.name=synthetic", "data.options={n_train: 120, n_test: 40, shape: [1, 8, 8], num_classes: 3}",
          "data.num_labeled=12", "data.batch_size=8", "data.unlabeled_batch_size=8", "model.name=small_cnn",
          "model.options={width: 4}", "remixmatch.K=2", "remixmatch.rampup_steps=0")


def trainer_with(tmp_path, *overrides, plugins=("remixmatch",)):
    return Trainer(make_config(*IMAGES, *overrides, plugins=list(plugins)), tmp_path, discover())


def modified(trainer, step=0, ctx=None):
    ctx = ctx or trainer.context(step, is_log=True)
    batch = trainer.draw(step)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return batch, ctx


# --- the pure functions ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [8, 10])
def test_rotate_quarters_labels_and_angles(n):
    x = torch.randn(n, 2, 5, 5)
    rotated, labels = rotate_quarters(x)
    assert labels.tolist() == [4 * i // n for i in range(n)] and set(labels.tolist()) == {0, 1, 2, 3}
    for i in range(n):
        torch.testing.assert_close(rotated[i], torch.rot90(x[i], int(labels[i]), (1, 2)))
        torch.testing.assert_close(torch.rot90(rotated[i], -int(labels[i]), (1, 2)), x[i])
    assert not torch.equal(rotated[-1], x[-1])


def test_rotation_head_is_an_extra_output_on_the_same_features():
    backbone = build_backbone("small_cnn", 3, (1, 8, 8), width=4)
    model = RotationHead(backbone).eval()
    x = torch.randn(5, 1, 8, 8)
    out = model(x)
    assert set(out) == {"logits", "rotation"} and out["rotation"].shape == (5, 4)
    torch.testing.assert_close(out["logits"], backbone(x))
    torch.testing.assert_close(out["rotation"], model.rotation(backbone.features(x)))
    with pytest.raises(ConfigError, match="features"):
        RotationHead(torch.nn.Linear(3, 3))


def test_distribution_alignment_is_the_identity_when_aligned_and_moves_mass_otherwise():
    probs = torch.rand(6, 3).softmax(-1)
    balanced = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    aligned = DistributionAlignment(0.9)  # starts with p_model uniform; the labels are balanced
    torch.testing.assert_close(aligned(probs, balanced), probs)
    skewed = DistributionAlignment(0.9)
    skewed.p_model = torch.tensor([0.6, 0.2, 0.2])
    skewed.label_counts = torch.zeros(3)
    out = skewed(probs, balanced)
    torch.testing.assert_close(out.sum(-1), torch.ones(6))
    assert (out[:, 0] < probs[:, 0]).all() and (out[:, 1:] > probs[:, 1:]).all()
    torch.testing.assert_close(skewed.p_model, 0.9 * torch.tensor([0.6, 0.2, 0.2]) + 0.1 * probs.mean(0))


# --- the plugin in the trainer --------------------------------------------------------------------

def test_anchoring_guesses_from_the_weak_view_only_and_targets_every_view(tmp_path, monkeypatch):
    monkeypatch.setattr(mixmatch_module, "mix_weights", lambda n, alpha, device=None: torch.ones(n, device=device))
    trainer = trainer_with(tmp_path, "remixmatch.distribution_alignment=false")
    views, guessed = [], []
    ctx = trainer.context(0, is_log=True)

    def augment(raw, view):
        views.append(view)
        return ctx.augment(raw, view)

    def predict(x, update_bn=True):
        guessed.append((x, update_bn))
        return ctx.predict(x, update_bn=update_bn)

    batch, _ = modified(trainer, ctx=dataclasses.replace(ctx, augment=augment, predict=predict))
    b = 8
    assert views == ["weak", "strong", "strong", "strong"]  # the anchor, K = 2 strong views, the labeled rows
    (anchor, update_bn), = guessed  # one guessing forward, on the anchor, batch norm untouched
    assert update_bn is False and anchor.shape[0] == b
    q = batch.extras["remixmatch/pseudo_labels"]
    with torch.no_grad():
        torch.testing.assert_close(q, sharpen(trainer.guess(anchor, update_bn=False).float().softmax(-1), 0.5))
    # with MixUp weights of 1 the pool is unmixed: [anchor, strong views] each with the target q
    assert batch.x_u.shape[0] == 3 * b and torch.equal(batch.x_u[:b], anchor)
    assert torch.equal(batch.x_u[b:2 * b], batch.extras["remixmatch/strong"])
    torch.testing.assert_close(batch.y_u, q.repeat(3, 1))
    assert batch.y_l.shape == (b, 3) and torch.equal(batch.y_l.argmax(-1), trainer.data.y_hidden[batch.idx_l])
    assert batch.y_u_hidden.shape == batch.idx_u.shape == (3 * b,)
    rotated, labels = batch.extras["remixmatch/rotated"], batch.extras["remixmatch/rotation_labels"]
    torch.testing.assert_close(rotated, rotate_quarters(batch.extras["remixmatch/strong"])[0])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_ramp_weights_match_and_pre_mixup_only(tmp_path):
    trainer = trainer_with(tmp_path, "remixmatch.rampup_steps=100")
    batch, ctx = modified(trainer, step=25)
    weights = {t.name: t.weight for t in trainer.make_closure(batch, ctx)().terms}
    assert weights == pytest.approx({"remixmatch/mixed": 1.5 * 0.25, "remixmatch/pre_mixup": 0.5 * 0.25,
                                     "remixmatch/rotation": 0.5})


def test_interleaved_forward_updates_batch_norm_once_and_extra_forwards_never(tmp_path):
    trainer = trainer_with(tmp_path)
    batch, ctx = modified(trainer)
    bn = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    count = bn.num_batches_tracked.clone()
    trainer.make_closure(batch, ctx)()
    assert bn.num_batches_tracked == count + 1


def test_bad_settings_fail_at_startup(tmp_path):
    with pytest.raises(ConfigError, match=r"\(K \+ 1\) \* data.unlabeled_batch_size"):
        trainer_with(tmp_path, "data.unlabeled_batch_size=6")
    trainer_with(tmp_path / "concat", "data.unlabeled_batch_size=6", "remixmatch.bn_mode=concat")
    with pytest.raises(ConfigError, match="square images"):
        Trainer(make_config("remixmatch.K=1", plugins=["remixmatch"]), tmp_path / "moons", discover())
    with pytest.raises(ConfigError, match="cannot run together"):
        trainer_with(tmp_path / "mm", plugins=("remixmatch", "mixmatch"))
    for bad in ("remixmatch.K=0", "remixmatch.T=0", "remixmatch.w_rot=-1", "remixmatch.alignment_momentum=1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            make_config(bad, plugins=["remixmatch"])


def test_vector_data_trains_without_the_rotation_head(ssl_run):
    run = ssl_run(plugins=["remixmatch"], steps=6, overrides=["remixmatch.w_rot=0", "remixmatch.K=1",
                                                               "remixmatch.rampup_steps=3"])
    assert not isinstance(run.trainer.model, RotationHead)
    assert run.scalars("remixmatch/pre_mixup") and run.scalars("remixmatch/guess_acc_pct")


def test_bf16_terms_agree_with_fp32(tmp_path):
    terms = {}
    for amp in ("none", "bf16"):
        trainer = trainer_with(tmp_path / amp, f"train.amp={amp}")
        batch, ctx = modified(trainer)
        terms[amp] = trainer.make_closure(batch, ctx)().reduced
    for name, value in terms["none"].items():
        torch.testing.assert_close(terms["bf16"][name], value, rtol=0.05, atol=1e-3)


def test_resume_is_exact_alignment_included(ssl_run):
    overrides = [*IMAGES, "remixmatch.rampup_steps=4", "remixmatch.alignment_momentum=0.5"]
    straight = ssl_run(plugins=["remixmatch"], steps=10, overrides=overrides)
    resumed = ssl_run(plugins=["remixmatch"], steps=5, overrides=overrides).resume(steps=10)
    for (name, a), b in zip(straight.trainer.model.state_dict().items(), resumed.trainer.model.state_dict().values()):
        assert torch.equal(a, b), name
    a, b = straight.plugin("remixmatch").alignment, resumed.plugin("remixmatch").alignment
    assert torch.equal(a.p_model, b.p_model) and torch.equal(a.label_counts, b.label_counts)
