"""Every plugin of the pseudo-labeling family: exact resume (state included), the compositions with NS3L and DS3L,
and the diagnostics they log."""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_IMAGES, make_config, prepared
from ssltrain import Interrupted, SSLPlugin, checkpoint, hookimpl
from ssltrain.loop import train
from ssltrain.plugins import discover
from ssltrain.testing import read_scalars
from ssltrain_plugins.ns3l import negative_mask, ns_loss
from ssltrain_plugins.pseudo_labeling import guessed_probs

FAMILY = {  # plugin: settings that make its state move on the tiny two-moons run
    "fixmatch": ["fixmatch.threshold=0.6"],
    "flexmatch": ["flexmatch.threshold=0.6"],
    "freematch": ["freematch.momentum=0.9"],
    "softmatch": ["softmatch.momentum=0.9"],
    "uda": ["uda.threshold=0.6", "uda.tsa=linear"],
    "pseudo_label": ["pseudo_label.threshold=0.6", "pseudo_label.warmup=0.2"],
}


class StopAt(SSLPlugin):
    """Sends SIGTERM after step `at` while armed: the run checkpoints there and stops (an interruption)."""

    armed, at = False, 4

    @hookimpl
    def ssl_step_end(self, ctx):
        if StopAt.armed and ctx.step == StopAt.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("plugin", sorted(FAMILY))
def test_an_interrupted_run_continues_bit_identically_state_included(tmp_path, plugin):
    classes = {**discover(), "stop": StopAt}
    config = make_config("train.steps=10", "train.eval_every=5", *FAMILY[plugin], classes={"stop": StopAt},
                         plugins=[plugin, "stop"])
    train(config, tmp_path / "straight", classes=classes)
    StopAt.armed = True
    try:
        with pytest.raises(Interrupted, match="step 5"):
            train(config, tmp_path / "resumed", classes=classes)
    finally:
        StopAt.armed = False
    train(config, tmp_path / "resumed", resume=True, classes=classes)
    a, b = (checkpoint.load(tmp_path / r / "checkpoints" / "last.pt") for r in ("straight", "resumed"))
    assert a["step"] == b["step"] == 10
    torch.testing.assert_close(a["model"], b["model"], rtol=0, atol=0)
    torch.testing.assert_close(a["ema"], b["ema"], rtol=0, atol=0)
    torch.testing.assert_close(a["plugins"], b["plugins"], rtol=0, atol=0)


@pytest.mark.parametrize("plugin", ["flexmatch", "freematch", "softmatch"])
def test_the_state_moves_during_training(tmp_path, plugin):
    train(make_config("train.steps=6", "train.eval_every=3", *FAMILY[plugin], plugins=[plugin]), tmp_path / "a")
    saved = [checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")["plugins"][plugin]]
    train(make_config("train.steps=3", "train.eval_every=3", *FAMILY[plugin], plugins=[plugin]), tmp_path / "b")
    saved.append(checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")["plugins"][plugin])
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


@pytest.mark.parametrize("plugins", [["fixmatch", "ns3l"], ["fixmatch", "ds3l"], ["flexmatch", "ds3l"],
                                     ["freematch", "ns3l", "ds3l"], ["softmatch", "ns3l"], ["uda", "ds3l"],
                                     ["pseudo_label", "ns3l"]])
def test_compositions_train_with_finite_losses_and_diagnostics(tmp_path, plugins):
    config = make_config("train.steps=6", "train.log_every=2", "ns3l.threshold=0.45", *FAMILY[plugins[0]],
                         plugins=plugins)
    summary = train(config, tmp_path / "run")
    assert math.isfinite(summary["test_top1"])
    scalars = read_scalars(tmp_path / "run")
    for tag in [f"{plugins[0]}/mask_rate", f"{plugins[0]}/pseudo_acc_all_pct", f"loss/{plugins[0]}/unlabeled",
                *(["loss/ns3l/unlabeled"] if "ns3l" in plugins else []),
                *(["ds3l/meta_loss"] if "ds3l" in plugins else [])]:
        assert tag in scalars, tag
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag


COMPOSED = {  # plugins: settings (FixMatch: a threshold that keeps some rows of the tiny images at step 0)
    ("fixmatch", "ns3l"): ["fixmatch.threshold=0.4"],
    ("fixmatch", "ds3l"): ["fixmatch.threshold=0.4"],
    ("flexmatch", "ds3l"): [],
    ("freematch", "ns3l", "ds3l"): [],
}


@pytest.mark.parametrize("plugins", list(COMPOSED))
def test_composed_terms_are_what_each_plugin_defines(plugins):
    """The composed loss, term by term, from each plugin's own definition and no pair-specific code: the guesser's
    masked term times DS3L's per-row weights, NS3L's negatives from the guesser's targets `outputs.y_u` on the
    strong rows (weight n_u / (n_l + n_u)) and on the labeled rows (n_l / (n_l + n_u), not weighted)."""
    config = make_config(*SMALL_IMAGES, "ns3l.threshold=0.2", "ns3l.weight=0.7", *COMPOSED[plugins],
                         plugins=list(plugins))
    trainer, batch, ctx, closure = prepared(config)
    if "ds3l" in plugins:
        trainer.pm.get_plugin("ds3l")._ensure_meta_net(ctx)
    result = closure()
    out, n_l, n_u = result.outputs, batch.x_l.shape[0], batch.x_u.shape[0]
    w = result.weights if result.weights is not None else torch.ones(n_u)
    if "ds3l" in plugins:
        assert w.shape == (n_u,) and not torch.allclose(w, torch.ones_like(w))
    terms = {t.name: t for t in result.terms}
    guess = terms[f"{plugins[0]}/unlabeled"]
    assert guess.per_sample.shape == (n_u,) and (guess.per_sample > 0).any()
    torch.testing.assert_close(result.reduced[guess.name], guess.weight * (w * guess.per_sample).mean())
    if "ns3l" in plugins:
        negatives_u = negative_mask(out.y_u, 0.2)
        assert negatives_u.any() and torch.equal(out.y_u, guessed_probs(out))
        unl, lab = terms["ns3l/unlabeled"], terms["ns3l/labeled"]
        torch.testing.assert_close(unl.per_sample, ns_loss(out.logits_u, negatives_u))
        assert unl.weight == pytest.approx(0.7 * n_u / (n_l + n_u))
        torch.testing.assert_close(result.reduced["ns3l/unlabeled"], unl.weight * (w * unl.per_sample).mean())
        negatives_l = negative_mask(F.one_hot(batch.y_l, ctx.num_classes).float(), 0.2)
        torch.testing.assert_close(lab.per_sample, ns_loss(out.logits_l, negatives_l))
        assert not lab.weighted and lab.weight == pytest.approx(0.7 * n_l / (n_l + n_u))
        torch.testing.assert_close(result.reduced["ns3l/labeled"], lab.weight * lab.per_sample.mean())
    if "freematch" in plugins:  # one number per step: DS3L's weights do not apply
        fair = terms["freematch/fairness"]
        torch.testing.assert_close(result.reduced["freematch/fairness"], fair.weight * fair.per_sample.mean())
    expected = result.reduced["supervised"] + sum(result.reduced[name] for name in terms)
    torch.testing.assert_close(result.total, expected)
