"""Each plugin's loss against its official code's, written out here as the official code reduces it
(docs/fidelity.md has the table and the file:line sources).

Every test takes one real step's closure on a tiny batch with unequal labeled and unlabeled batches
(B_l = 16, B_u = 32, unless the official code's own batch split is needed), computes the official loss
from the same per-row values (or logits) and checks the ratio of terms: our total equals the official
total up to one factor of the whole loss (B_l + B_u) / B_l where the official code divides by the whole
batch; an optimizer like Adam does not see such a factor, a wrong ratio of terms it does.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_config
from ssltrain.loop import Trainer

IMAGES = ("data.name=synthetic", "data.options={n_train: 64, n_test: 8, shape: [1, 8, 8], num_classes: 4}",
          "model.name=small_cnn", "model.options={width: 4}")


def step_loss(*overrides: str, plugins: list[str], step: int = 0):
    """The closure result of `step` of a tiny run, with its batch."""
    return trainer_step(*overrides, plugins=plugins, step=step)[1:]


def trainer_step(*overrides: str, plugins: list[str], step: int = 0):
    """(trainer, closure result, batch) of `step` of a tiny run."""
    trainer = Trainer(make_config(*overrides, plugins=plugins), "unused")
    torch.manual_seed(0)
    ctx, batch = trainer.context(step), trainer.draw(step)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return trainer, trainer.make_closure(batch, ctx)(), batch


def term(loss, name: str) -> torch.Tensor:
    return next(t for t in loss.terms if t.name == name).per_sample.detach()


def whole_batch_official(loss, batch, sums: torch.Tensor) -> torch.Tensor:
    """(sum_l CE + sums) / (B_l + B_u), rescaled by (B_l + B_u) / B_l: the official total against a labeled mean."""
    n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
    official = (loss.supervised.detach().sum() + sums) / (n_l + n_u)
    return official * (n_l + n_u) / n_l


def test_vat_matches_oliver_et_al_whole_batch_average_with_an_unramped_entmin():
    """perrying train.py:152-166 and lib/algs/vat.py:40: (sum_l CE + w(t) 0.3 sum_u KL + 0.06 sum_u H) / (B_l + B_u)."""
    loss, batch = step_loss("vat.rampup_steps=10", "vat.entmin_weight=0.06", "vat.epsilon=1.0", plugins=["vat"])
    ramp = math.exp(-5.0)  # step 0 of a 10-step ramp; EntMin is not ramped
    kl, ent = term(loss, "vat/kl"), term(loss, "vat/entmin")
    assert batch.x_l.shape[0] != batch.x_u.shape[0] and kl.sum() > 0
    expected = whole_batch_official(loss, batch, 0.3 * ramp * kl.sum() + 0.06 * ent.sum())
    torch.testing.assert_close(loss.total.detach(), expected)


def test_vat_loss_is_kl_of_the_perturbed_prediction_to_the_clean_one(monkeypatch):
    """perrying lib/algs/vat.py:12-16, 40: kld(y_hat, y) = KL(p(x + r_adv) || p(x)) (Oliver et al.'s order)."""
    import ssltrain_plugins.vat as vat
    r = torch.full((32, 2), 0.5)
    monkeypatch.setattr(vat, "adversarial_perturbation", lambda *a, **k: r)
    trainer = Trainer(make_config(plugins=["vat"]), "unused")
    ctx, batch, forward = trainer.context(0), trainer.draw(0), trainer.forward_fn()
    loss = trainer.make_closure(batch, ctx)()
    with torch.no_grad():
        logits = forward(torch.cat([batch.x_l, batch.x_u + r]), update_bn=False)["logits"][batch.x_l.shape[0]:]
    q, p = logits.softmax(-1), loss.outputs.logits_u.detach().softmax(-1)
    torch.testing.assert_close(term(loss, "vat/kl"), (q * (q.log() - p.log())).sum(-1))


def test_ns3l_alone_matches_its_official_whole_batch_average():
    """NS3L ns3l.py:25-26 in perrying train.py:161: (sum_l CE + 1 * sum_u l_NS) / (B_l + B_u)."""
    loss, batch = step_loss(*IMAGES, "ns3l.threshold=0.2", "data.batch_size=8", "data.unlabeled_batch_size=24",
                            plugins=["ns3l"])
    ns = term(loss, "ns3l/unlabeled")
    assert ns.sum() > 0
    torch.testing.assert_close(loss.total.detach(), whole_batch_official(loss, batch, ns.sum()))


def test_vat_with_ns3l_matches_the_papers_vat_host():
    """methods.md 2c: (sum_l CE + w(t) (0.3 sum_u KL + 0.3 sum_u l_NS)) / (B_l + B_u)."""
    loss, batch = step_loss(*IMAGES, "vat.weight=0.3", "vat.epsilon=1.0", "ns3l.weight=0.3", "ns3l.threshold=0.2",
                            "data.batch_size=8", "data.unlabeled_batch_size=24", plugins=["vat", "ns3l"])
    kl, ns = term(loss, "vat/kl"), term(loss, "ns3l/unlabeled")
    assert kl.sum() > 0 and ns.sum() > 0
    torch.testing.assert_close(loss.total.detach(), whole_batch_official(loss, batch, 0.3 * kl.sum() + 0.3 * ns.sum()))


def mixmatch_official(loss, batch, lambda_u: float) -> torch.Tensor:
    """google-research/mixmatch mixmatch.py:81-84, 94: mean soft CE over X' + lambda_u * mean over U' rows and classes."""
    out = loss.outputs
    xe = -(batch.y_l * out.logits_l.detach().float().log_softmax(-1)).sum(-1).mean()
    l2u = (batch.y_u - out.logits_u.detach().float().softmax(-1)).pow(2).mean()
    return xe + lambda_u * l2u


def test_mixmatch_matches_its_official_loss():
    loss, batch = step_loss("mixmatch.rampup_steps=0", plugins=["mixmatch"])
    torch.testing.assert_close(loss.total.detach(), mixmatch_official(loss, batch, 75.0))


def test_mixmatch_with_ns3l_adds_lambda1_times_the_mean_over_every_mixed_row():
    """The NS3L paper (methods.md 2b): L_X + lambda_U L_U + lambda1 * mean over X' and U' of l_NS."""
    loss, batch = step_loss("mixmatch.rampup_steps=0", "ns3l.weight=5", "ns3l.threshold=0.4",
                            plugins=["mixmatch", "ns3l"])
    ns_all = torch.cat([term(loss, "ns3l/labeled"), term(loss, "ns3l/unlabeled")])
    assert ns_all.shape[0] == batch.x_l.shape[0] + batch.x_u.shape[0] == 16 + 2 * 32 and ns_all.sum() > 0
    torch.testing.assert_close(loss.total.detach(), mixmatch_official(loss, batch, 75.0) + 5 * ns_all.mean())


def test_pi_model_matches_mixmatchs_per_batch_means_and_oliver_et_al_at_equal_batches():
    """google-research/mixmatch pi_model.py:51-55, 65: mean CE + 20 * mean_u Omega (table5.sh:26); brain-research
    ssl_framework.py:125-130 + ssl_utils.py:109-111: (sum_l CE + 20 sum_u Omega) / (B_l + B_u)."""
    loss, batch = step_loss("pi_model.rampup_steps=0", plugins=["pi_model"])  # B_l 16, B_u 32
    omega = term(loss, "pi_model/consistency")
    torch.testing.assert_close(loss.total.detach(), loss.supervised.detach().mean() + 20 * omega.mean())
    loss, batch = step_loss("pi_model.rampup_steps=0", "data.unlabeled_batch_size=16", plugins=["pi_model"])
    omega = term(loss, "pi_model/consistency")
    torch.testing.assert_close(loss.total.detach(), whole_batch_official(loss, batch, 20 * omega.sum()))


def test_pi_model_ramps_over_40_percent_of_the_run_by_default():
    loss, _ = step_loss("train.steps=100", plugins=["pi_model"], step=20)
    (t,) = loss.terms
    assert t.weight == pytest.approx(20 * math.exp(-5 * (1 - 20 / 40) ** 2))


def test_ds3l_with_the_configs_pi_weight_matches_the_official_loss_at_equal_batches():
    """guolz-ml/DS3L train.py:105, 116-118: sum_l CE / (B_l + B_u) + 10 w(t) sum_u w Omega / sum_u w; our
    configs/ds3l_fashion_mnist.yaml sets pi_model.weight = 10 (B_l + B_u) / B_l = 20 at B_l = B_u."""
    loss, batch = step_loss("pi_model.rampup_steps=0", "pi_model.weight=20", "data.unlabeled_batch_size=16",
                            plugins=["pi_model", "ds3l"])
    omega, w = term(loss, "pi_model/consistency"), loss.weights.detach()
    n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
    official = loss.supervised.detach().sum() / (n_l + n_u) + 10 * (w * omega).sum() / w.sum()
    torch.testing.assert_close(loss.total.detach(), official * (n_l + n_u) / n_l)


def test_sla_sd_matches_its_official_loss():
    """hankook/SLA trainers.py:130-147: CE over the B*M joint rows + CE of the SD head + T^2 KL(AG || SD), batch means."""
    loss, batch = step_loss(*IMAGES, "sla.sd=true", "sla.temperature=2.0", plugins=["sla"])
    out, m, t = loss.outputs, 4, 2.0
    joint, single = out.logits_l.detach(), out.extras_l["sd_logits"].detach()[::m]
    labels = batch.y_l[::m] // m
    agg = sum(joint[i::m, i::m] for i in range(m)) / m
    official = (F.cross_entropy(joint, batch.y_l) + F.cross_entropy(single, labels)
                + F.kl_div(F.log_softmax(single / t, 1), F.softmax(agg / t, 1), reduction="batchmean") * t * t)
    torch.testing.assert_close(loss.total.detach(), official)


def test_mean_teacher_matches_its_official_whole_batch_average():
    """CuriousAI/mean-teacher pytorch/main.py:254, 263 and losses.py:15-27: (1/N) sum_l CE + w (1/N) sum over all N
    rows of the softmax MSE summed over classes / C, N = B_l + B_u; ours is that times N / B_l."""
    loss, batch = step_loss("mean_teacher.rampup_steps=0", "mean_teacher.consistency=7", plugins=["mean_teacher"])
    out = loss.outputs
    student = torch.cat([out.logits_l, out.logits_u]).detach().float()
    teacher = torch.cat([batch.extras["mean_teacher/targets_l"], batch.extras["mean_teacher/targets_u"]])
    mse = F.mse_loss(student.softmax(1), teacher.softmax(1), reduction="sum") / student.shape[1]
    torch.testing.assert_close(loss.total.detach(), whole_batch_official(loss, batch, 7 * mse))


def test_remixmatch_matches_its_official_sum_of_means():
    """google-research/remixmatch remixmatch_no_cta.py:160-163: loss_xe + w_kl * loss_kl + w_match * loss_xeu +
    w_rot * loss_rot, each a mean over its own rows (no conversion)."""
    trainer, loss, batch = trainer_step(*IMAGES, "remixmatch.K=2", "remixmatch.rampup_steps=0", "remixmatch.w_kl=0.3",
                                        "remixmatch.w_match=2.0", "remixmatch.w_rot=0.7", plugins=["remixmatch"])
    out, q, forward = loss.outputs, batch.extras["remixmatch/pseudo_labels"], trainer.forward_fn()
    with torch.no_grad():  # the same forwards as the closure's (batch statistics, no update)
        strong = forward(batch.extras["remixmatch/strong"], update_bn=False)["logits"]
        rotation = forward(batch.extras["remixmatch/rotated"], update_bn=False)["rotation"]
    official = (-(batch.y_l * out.logits_l.float().log_softmax(-1)).sum(-1).mean()
                + 0.3 * -(q * strong.float().log_softmax(-1)).sum(-1).mean()
                + 2.0 * -(batch.y_u * out.logits_u.float().log_softmax(-1)).sum(-1).mean()
                + 0.7 * F.cross_entropy(rotation.float(), batch.extras["remixmatch/rotation_labels"]))
    torch.testing.assert_close(loss.total.detach(), official.detach())
