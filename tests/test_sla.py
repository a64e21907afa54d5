"""SLA plugin: the invariants of methods.md 5g and 5h, the plugin's hooks, and a tiny training run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_config
from test_hooks import first_closure
from ssltrain import ConfigError, SSLBatch, SSLPlugin, checkpoint
from ssltrain import datasets as ds
from ssltrain.loop import Trainer, train
from ssltrain.models import build_backbone
from ssltrain.plugins import discover
from ssltrain_plugins.sla import (SLA, TRANSFORMS, SLAModel, aggregated_logits, distillation_kl, joint_labels,
                                  mode_accuracies, predict_scores, single_logits, transform_copies,
                                  transformation_nll)

ROT = TRANSFORMS["rotation"]


def sla_model(num_classes=3, m=4, sd=True, channels=3, seed=0):
    torch.manual_seed(seed)
    backbone = build_backbone("small_cnn", num_classes, (channels, 8, 8), width=4)
    return SLAModel(backbone, num_classes, m, sd).eval()


# --- layout, labels, transformations --------------------------------------------------------------

def test_row_layout_and_joint_labels():
    x = torch.randn(3, 2, 5, 5)
    out = transform_copies(x, ROT)
    assert out.shape == (12, 2, 5, 5)
    for b in range(3):
        for j in range(4):
            assert torch.equal(out[b * 4 + j], torch.rot90(x[b], j, (1, 2)))
    y = torch.tensor([2, 0, 1])
    joint = joint_labels(y, 4)
    assert joint.tolist() == [8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7]
    rows = torch.arange(12)
    assert torch.equal(joint // 4, y.repeat_interleave(4)) and torch.equal(joint % 4, rows % 4)


def test_modify_batch_transforms_labeled_rows_only():
    plugin = SLA(SLA.Config())
    x_l, x_u = torch.randn(2, 1, 4, 4), torch.randn(5, 1, 4, 4)
    batch = SSLBatch(x_l=x_l, y_l=torch.tensor([1, 0]), x_u=x_u, raw_l=x_l, raw_u=x_u,
                     y_u_hidden=torch.zeros(5, dtype=torch.long), idx_u=torch.arange(5), idx_l=torch.tensor([7, 3]))
    plugin.ssl_modify_batch(batch)
    assert torch.equal(batch.x_l, transform_copies(x_l, ROT)) and batch.x_u is x_u
    assert batch.y_l.tolist() == [4, 5, 6, 7, 0, 1, 2, 3] and batch.idx_l.tolist() == [7] * 4 + [3] * 4
    batch.y_l = torch.rand(8, 3)
    with pytest.raises(ConfigError, match="integer labels"):
        plugin.ssl_modify_batch(batch)


def test_rotations():
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(torch.rot90(x, 4, (2, 3)), x)
    copies = transform_copies(x, ROT).view(2, 4, 3, 6, 6)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(copies[:, a], copies[:, b])  # a random image has no rotation symmetry
    const = torch.full((1, 3, 6, 6), 0.7)
    assert all(torch.equal(c, const[0]) for c in transform_copies(const, ROT))


@pytest.mark.parametrize("name, m", [("rotation", 4), ("rotation2", 2), ("color_perm", 6), ("color_perm3", 3),
                                     ("rot_color_perm6", 6), ("rot_color_perm12", 12), ("rot_color_perm24", 24)])
def test_transform_options(name, m):
    x = torch.randn(2, 3, 5, 5)
    copies = transform_copies(x, TRANSFORMS[name]).view(2, m, 3, 5, 5)
    assert torch.equal(copies[:, 0], x)  # t_0 is the identity
    flat = copies.transpose(0, 1).flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) == m  # M distinct transformations


def test_colour_permutation_order_follows_official_code():
    x = torch.randn(1, 3, 2, 2)
    perm6 = transform_copies(x, TRANSFORMS["color_perm"])
    for j, order in enumerate([(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]):
        assert torch.equal(perm6[j], x[0, list(order)])
    rcp = transform_copies(x, TRANSFORMS["rot_color_perm6"])
    assert torch.equal(rcp[4], torch.rot90(x, 2, (2, 3))[0, [1, 2, 0]])  # rotation-major: j = 3*k + p


# --- aggregation ------------------------------------------------------------------------------------

def test_aggregation_matches_strided_loop_and_is_linear_in_logits():
    b, n, m = 5, 3, 4
    logits = torch.randn(b * m, n * m)
    loop = sum(logits[j::m, j::m] for j in range(m)) / m
    torch.testing.assert_close(aggregated_logits(logits, m), loop)
    for bb in range(b):
        for i in range(n):
            expect = sum(logits[bb * m + j, i * m + j] for j in range(m)) / m
            torch.testing.assert_close(aggregated_logits(logits, m)[bb, i], expect)
    assert torch.equal(single_logits(logits, m), logits[0::m, 0::m])
    other = torch.randn(b * m, n * m)  # averaging logits is linear; averaging probabilities is not
    torch.testing.assert_close(aggregated_logits(2 * logits - other, m),
                               2 * aggregated_logits(logits, m) - aggregated_logits(other, m))


def test_aggregation_invariant_to_reordering_copy_slot_pairs():
    b, n, m = 3, 4, 4
    logits = torch.randn(b * m, n * m)
    perm = torch.tensor([2, 0, 3, 1])  # new copy/slot k is old copy/slot perm[k]
    rows = (torch.arange(b)[:, None] * m + perm).flatten()
    cols = (torch.arange(n)[:, None] * m + perm).flatten()
    torch.testing.assert_close(aggregated_logits(logits[rows][:, cols], m), aggregated_logits(logits, m))


def test_single_transformation_reduces_to_plain_cross_entropy():
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert torch.equal(joint_labels(y, 1), y)
    x = torch.randn(6, 1, 3, 3)
    assert torch.equal(transform_copies(x, ROT[:1]), x)
    torch.testing.assert_close(F.cross_entropy(logits, joint_labels(y, 1)), F.cross_entropy(logits, y))
    assert torch.equal(aggregated_logits(logits, 1), single_logits(logits, 1))


def test_rotation_invariant_input_corrected_invariant():
    """Constant image: every copy gives the same joint logits v, so AG_i = mean_j v[i*M + j]. That equals
    SI = v[i*M] only for a slot-consistent head; in general AG != SI."""
    model, m, n = sla_model(), 4, 3
    x = torch.full((1, 3, 8, 8), 0.3)
    with torch.no_grad():
        joint = model(transform_copies(x, ROT))["logits"]
        v = joint[0]
        assert all(torch.allclose(row, v, atol=1e-6) for row in joint)
        ag, si = predict_scores(model, x, "ag", ROT)[0], predict_scores(model, x, "si", ROT)[0]
        torch.testing.assert_close(ag, v.view(n, m).mean(1))
        torch.testing.assert_close(si, v.view(n, m)[:, 0])
        assert not torch.allclose(ag, si)  # the random joint head is not slot-consistent
        w, bias = model.head.weight.view(n, m, -1), model.head.bias.view(n, m)
        w.copy_(w[:, :1].expand_as(w).clone())
        bias.copy_(bias[:, :1].expand_as(bias).clone())
        torch.testing.assert_close(predict_scores(model, x, "ag", ROT), predict_scores(model, x, "si", ROT))


# --- prediction ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 5, 9])  # 9 rows: AG forwards 3 chunks of 3 images x 4 copies
def test_predict_modes_against_a_hand_written_loop(batch):
    model, m = sla_model(), 4
    x = torch.randn(batch, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
        assert out["logits"].shape == (batch, 12) and out["sd_logits"].shape == (batch, 3)
        loop = sum(model(torch.rot90(x, j, (2, 3)))["logits"][:, j::m] for j in range(m)) / m
        torch.testing.assert_close(predict_scores(model, x, "ag", ROT), loop, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(predict_scores(model, x, "si", ROT), out["logits"][:, 0::m])
        torch.testing.assert_close(predict_scores(model, x, "sd", ROT), out["sd_logits"])
        y = torch.randint(0, 3, (batch,))
        accs = mode_accuracies(model, x, y, ROT, batch_size=2)
        for mode in ("si", "ag", "sd"):
            expect = 100.0 * (predict_scores(model, x, mode, ROT).argmax(-1) == y).float().mean().item()
            assert accs[mode] == pytest.approx(expect)


def test_ag_in_train_mode_is_one_forward_with_batch_statistics():
    model, x = sla_model().train(), torch.randn(9, 3, 8, 8)
    with torch.no_grad():
        whole = aggregated_logits(model(transform_copies(x, ROT))["logits"], 4)
        torch.testing.assert_close(predict_scores(model, x, "ag", ROT), whole)


def test_model_wrapper_replaces_the_head():
    model = sla_model(num_classes=3, m=4, sd=False)
    assert model.head.out_features == 12 and model.sd_head is None
    assert isinstance(model.backbone.head, nn.Identity)
    assert set(model(torch.randn(2, 3, 8, 8))) == {"logits"}
    backbone = build_backbone("small_cnn", 3, (3, 8, 8), width=4)
    backbone.head = nn.Sequential(nn.Linear(16, 3))
    with pytest.raises(ConfigError, match="nn.Linear"):
        SLAModel(backbone, 3, 4, sd=False)


# --- self-distillation -----------------------------------------------------------------------------

def test_distillation_kl():
    v, s = torch.randn(6, 4), torch.randn(6, 4)
    for t in (1.0, 2.0):
        kl = distillation_kl(v, s, t)
        assert kl.shape == (6,) and (kl >= 0).all()
        official = F.kl_div((v / t).log_softmax(1), (s / t).softmax(1), reduction="batchmean") * t * t
        torch.testing.assert_close(kl.mean(), official)
    assert distillation_kl(v, v + 3.0, 1.0).abs().max() < 1e-5  # zero iff the softmaxes agree


def test_no_gradient_into_the_joint_head_through_the_kl():
    model, m = sla_model(), 4
    model.train()
    out = model(transform_copies(torch.randn(2, 3, 8, 8), ROT))
    distillation_kl(out["sd_logits"][0::m], aggregated_logits(out["logits"], m), 1.0).sum().backward()
    assert model.head.weight.grad is None and model.head.bias.grad is None
    assert model.sd_head.weight.grad.abs().sum() > 0


# --- 5h: the unlabeled extension (project design, not in the paper) ------------------------------

def test_transformation_nll():
    b, n, m = 3, 4, 4
    logits = torch.randn(b * m, n * m)
    nll = transformation_nll(logits, m)
    assert nll.shape == (b, m) and (nll >= 0).all()
    probs = logits.softmax(-1).view(b, m, n, m).sum(2)  # p(slot j' | copy j)
    torch.testing.assert_close(nll, -probs.diagonal(dim1=1, dim2=2).log())


def test_transformation_nll_with_one_class_is_the_joint_cross_entropy():
    b, m = 4, 4
    logits = torch.randn(b * m, m)
    ce = F.cross_entropy(logits, joint_labels(torch.zeros(b, dtype=torch.long), m), reduction="none")
    torch.testing.assert_close(transformation_nll(logits, m), ce.view(b, m))


def test_transformation_nll_ignores_how_mass_is_split_among_classes():
    b, n, m = 2, 3, 4
    logits = torch.randn(b * m, n * m)
    swapped = logits.clone()
    j = 2  # swap classes 0 and 2 inside slot j
    swapped[:, [0 * m + j, 2 * m + j]] = logits[:, [2 * m + j, 0 * m + j]]
    torch.testing.assert_close(transformation_nll(swapped, m), transformation_nll(logits, m))


# --- configuration --------------------------------------------------------------------------------

class Stub(SSLPlugin):
    """Stands in for another method's plugin, so the check does not depend on its implementation."""


@pytest.mark.parametrize("other", ["mixmatch", "flowgmm"])
def test_sla_rejects_mixmatch_and_flowgmm_with_the_reason(tmp_path, tiny_images, other):
    config = image_config(plugins=["sla", other], classes={other: Stub})
    with pytest.raises(ConfigError, match=rf"plugins 'sla' and '{other}' cannot run together: .*(label|head)"):
        Trainer(config, tmp_path, {**discover(), other: Stub})


def test_config_errors(tmp_path, tiny_images):
    with pytest.raises(ConfigError, match="sla.sd=true"):
        Trainer(image_config("sla.predict=sd"), tmp_path)
    with pytest.raises(ConfigError, match="3 channels"):
        Trainer(image_config("sla.transform=color_perm", "data.options.channels=1"), tmp_path)


# --- training -------------------------------------------------------------------------------------

@pytest.fixture
def tiny_images(monkeypatch):
    """A random 8x8 image dataset with 3 classes registered as data.name=tiny_images."""
    def load(root=None, download=False, channels=3):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (90, channels, 8, 8), generator=g, dtype=torch.uint8)
        y = torch.arange(90) % 3
        mean, std = ds.image_stats(x[:60])
        return ds.DatasetArrays(x[:60], y[:60], x[60:], y[60:], 3, "image", ["a", "b", "c"], mean, std)
    monkeypatch.setitem(ds.DATASETS, "tiny_images", load)


def image_config(*overrides, classes=None, plugins=("sla",)):
    return make_config(*overrides, classes=classes, plugins=list(plugins),
                       data={"name": "tiny_images", "num_labeled": 30, "batch_size": 4, "unlabeled_batch_size": 6},
                       model={"name": "small_cnn", "options": {"width": 4}})


def test_training_step_terms_and_unlabeled_draw(tmp_path, tiny_images):
    supervised = Trainer(image_config("sla.sd=true"), tmp_path)
    assert not supervised.uses_unlabeled and supervised.draw(0).x_u.shape[0] == 0
    trainer = Trainer(image_config("sla.sd=true", "sla.unlabeled=true"), tmp_path)
    assert trainer.uses_unlabeled
    batch, ctx, closure = first_closure(trainer)
    loss = closure()
    assert loss.supervised.shape == (16,) and torch.equal(batch.y_l % 4, torch.arange(16) % 4)
    shapes = {t.name: tuple(t.per_sample.shape) for t in loss.terms}
    assert shapes == {"sla/sd_ce": (4,), "sla/sd_kl": (4,), "sla/rot": (6, 4), "sla/sd_unlabeled": (6,)}
    assert all(torch.isfinite(v) for v in loss.reduced.values())
    loss.total.backward()
    assert trainer.model.head.weight.grad.abs().sum() > 0 and trainer.model.sd_head.weight.grad.abs().sum() > 0


def test_tiny_training_resumes_exactly(tmp_path, tiny_images):
    overrides = ("sla.sd=true", "sla.unlabeled=true", "train.eval_every=3", "train.checkpoint_every=3")
    summary = train(image_config("train.steps=6", *overrides), tmp_path / "full")
    assert summary["steps"] == 6 and 0 <= summary["test_top1"] <= 100
    modes = {k: v for k, v in summary["final_eval"].items() if k.startswith("sla/top1_")}
    assert set(modes) == {"sla/top1_si", "sla/top1_ag", "sla/top1_sd"} and all(0 <= v <= 100 for v in modes.values())
    assert modes["sla/top1_ag"] == pytest.approx(summary["test_top1"])  # sla.predict (default ag) made test_top1
    train(image_config("train.steps=3", *overrides), tmp_path / "resumed")
    train(image_config("train.steps=6", *overrides), tmp_path / "resumed", resume=True)
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys() and "sd_head.weight" in a["model"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], msg=k)
