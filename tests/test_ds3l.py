"""DS3L (methods.md section 3): the invariants of 3g, the plugin's wiring, diagnostics and checkpoints."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from ssltrain import ConfigError, LossTerm, SSLPlugin, checkpoint, hookimpl
from ssltrain.config import load_yaml
from ssltrain.data import build_data
from ssltrain.loop import Trainer, reduce_term, train
from ssltrain.plugins import discover
from ssltrain_plugins.ds3l import (auroc, build_meta_net, meta_update, sample_weights, self_normalize, virtual_step,
                                   weight_stats)

from conftest import make_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def blobs(tmp_path) -> list[str]:
    """Overrides for a tiny 3-class data set (a .npz of Gaussian blobs); classes 0, 1 seen, 2 unseen."""
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 3.0], [3.0, 0.0], [-3.0, -3.0]])

    def sample(n):
        y = torch.arange(n) % 3
        return (centers[y] + 0.7 * torch.randn(n, 2, generator=g)).numpy(), y.numpy()

    (x_train, y_train), (x_test, y_test) = sample(300), sample(150)
    path = tmp_path / "blobs.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return ["data.name=tabular", f"data.root={path}", "data.options={}", "data.num_unlabeled=100",
            "data.class_mismatch={name: blobs_2seen, seen_classes: [0, 1], unseen_ratio: 0.5}"]


def trainer_for(tmp_path, *overrides, plugins=("pi_model", "ds3l"), classes=None) -> Trainer:
    config = make_config(*overrides, classes=classes, plugins=list(plugins))
    return Trainer(config, tmp_path / "run", {**discover(), **(classes or {})})


def first_step(trainer: Trainer, step: int = 0):
    """The batch, context and closure of one step, as the loop builds them."""
    ctx = trainer.context(step)
    batch = trainer.draw(step)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return batch, ctx, trainer.make_closure(batch, ctx)


def optimizer_step(trainer: Trainer, ctx, closure):
    return trainer.hook.ssl_optimizer_step(closure=closure, model=trainer.model, optimizer=trainer.optimizer,
                                           scaler=trainer.scaler, ctx=ctx)


def meta_grads(trainer: Trainer) -> list[torch.Tensor]:
    return [p.grad for p in trainer.pm.get_plugin("ds3l").meta_net.parameters()]


# --- 3g invariants ---------------------------------------------------------------------------------

@pytest.mark.parametrize("c", [1e-3, 0.5, 0.999])
@pytest.mark.parametrize("shape", [(12,), (12, 3)])
def test_constant_weights_reduce_to_the_plain_mean_whatever_c(c, shape):
    omega = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    w = self_normalize(torch.full((12,), c))
    torch.testing.assert_close(reduce_term(LossTerm("pi_model/consistency", omega), w, 12), omega.mean())


def test_self_normalized_term_is_the_weighted_average():
    omega, w = torch.rand(12), torch.rand(12)
    torch.testing.assert_close(reduce_term(LossTerm("a/b", omega), self_normalize(w), 12),
                               (w * omega).sum() / w.sum())


def test_weights_lie_in_the_open_unit_interval():
    torch.manual_seed(0)
    net = build_meta_net(6, 100)
    logits = 30 * torch.randn(500, 6)  # saturated distributions included
    w = sample_weights(net, logits.requires_grad_())
    assert w.shape == (500,) and w.dtype == torch.float32
    assert bool(((w > 0) & (w < 1)).all())
    w.sum().backward()
    assert logits.grad is None and all(p.grad is not None for p in net.parameters())  # input detached


@pytest.mark.parametrize("normalize", [True, False])
def test_plugin_weights_normalized_or_the_papers_raw_form(tmp_path, normalize):
    trainer = trainer_for(tmp_path, f"ds3l.normalize_weights={normalize}")
    batch, ctx, closure = first_step(trainer)
    loss = closure()
    raw = sample_weights(trainer.pm.get_plugin("ds3l").meta_net, loss.outputs.logits_u)
    assert loss.weights.shape == (batch.x_u.shape[0],)
    torch.testing.assert_close(loss.weights, raw / raw.mean() if normalize else raw)


def test_the_virtual_step_weights_see_the_live_prediction_the_real_step_a_detached_one(tmp_path):
    """guolz-ml/DS3L train.py:113 (virtual step: wnet(out.softmax(1)), out not detached) and 140-141 (no_grad)."""
    trainer = trainer_for(tmp_path)
    batch, ctx, closure = first_step(trainer)
    plugin, params = trainer.pm.get_plugin("ds3l"), dict(trainer.model.named_parameters())
    plugin._ensure_meta_net(ctx)
    plugin._in_meta_step = True
    meta = closure(params=params)
    plugin._in_meta_step = False
    grads = torch.autograd.grad(meta.weights[0], list(params.values()), allow_unused=True)  # one row: sum is constant
    assert any(g is not None and bool((g != 0).any()) for g in grads)  # the weights depend on θ
    assert not closure().weights.requires_grad


def test_the_real_update_has_no_grad_path_into_the_meta_net(tmp_path):
    trainer = trainer_for(tmp_path)
    batch, ctx, closure = first_step(trainer)
    loss = closure()  # the closure of the real step (outside the meta step)
    assert not loss.weights.requires_grad
    loss.total.backward()
    assert all(g is None for g in meta_grads(trainer))
    assert all(p.grad is not None for p in trainer.model.parameters())


class ZeroOmega(SSLPlugin):
    """An unlabeled term that is identically zero but depends on the model (Ω ≡ 0)."""

    @hookimpl
    def ssl_unlabeled_loss(self, outputs):
        return LossTerm("zero/omega", 0 * outputs.logits_u.float().pow(2).sum(1))


@pytest.mark.parametrize("case", ["lambda=0", "omega=0"])
def test_no_ssl_signal_means_zero_meta_gradient_and_a_supervised_update(tmp_path, case):
    if case == "lambda=0":
        trainer = trainer_for(tmp_path / "a", "pi_model.weight=0")
    else:
        trainer = trainer_for(tmp_path / "a", plugins=("zero", "ds3l"), classes={"zero": ZeroOmega})
    batch, ctx, closure = first_step(trainer)
    optimizer_step(trainer, ctx, closure)
    grads = meta_grads(trainer)
    assert all(g is not None and bool((g == 0).all()) for g in grads)

    supervised = trainer_for(tmp_path / "b", plugins=())
    _, ctx_s, closure_s = first_step(supervised)
    optimizer_step(supervised, ctx_s, closure_s)
    for (name, p), q in zip(trainer.model.named_parameters(), supervised.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_the_meta_gradient_is_not_zero_with_an_ssl_signal(tmp_path):
    trainer = trainer_for(tmp_path, "pi_model.weight=10")
    batch, ctx, closure = first_step(trainer)
    optimizer_step(trainer, ctx, closure)
    assert any(bool((g != 0).any()) for g in meta_grads(trainer))


class BNModel(SSLPlugin):
    """Owns a model with batch norm, so that the test can see running statistics move."""

    @hookimpl
    def ssl_build_model(self, num_classes, input_shape):
        return nn.Sequential(nn.Linear(input_shape[0], 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))


def test_the_meta_step_leaves_real_parameters_and_bn_statistics_bit_identical(tmp_path):
    trainer = trainer_for(tmp_path, plugins=("bn", "pi_model", "ds3l"), classes={"bn": BNModel})
    batch, ctx, closure = first_step(trainer)
    plugin = trainer.pm.get_plugin("ds3l")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    step = plugin.ssl_optimizer_step(closure=closure, model=trainer.model, ctx=ctx)
    next(step)  # the wrapper's part before `yield`: the meta step, up to the real update
    step.close()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in trainer.model.parameters())
    assert any(bool((g != 0).any()) for g in meta_grads(trainer))
    closure()  # a real forward does move the statistics, so the comparison above can fail
    assert not torch.equal(trainer.model.state_dict()["1.running_mean"], before["1.running_mean"])


def test_toy_meta_gradient_raises_the_weight_of_the_helpful_sample():
    """Linear model f(x) = θ·x, squared loss, normalisation off. Unlabeled row a's target agrees with the
    label (∇Ω_a aligned with ∇L), row b's contradicts it (anti-aligned): ∂L_meta/∂w_a < 0 < ∂L_meta/∂w_b,
    and one meta step raises w_a relative to w_b."""
    eta, x, y = 0.1, torch.tensor([1.0, 0.0]), 1.0
    targets = torch.tensor([1.0, -1.0])  # rows a, b (same input x)

    def closure(weights):
        def run(params, labeled_only=False):
            pred = params["theta"] @ x
            sup = (pred - y) ** 2
            if labeled_only:
                return SimpleNamespace(total=sup, weights=None)
            w = weights()
            return SimpleNamespace(total=sup + (w * (pred - targets) ** 2).sum(), weights=w)
        return run

    # exact meta-gradient through the virtual step: θ̂ = 2η(1 + w_a − w_b) x, ∂L/∂w_a = 4η(θ̂·x − 1) = −∂L/∂w_b
    theta = {"theta": torch.zeros(2, requires_grad=True)}
    w = torch.tensor([0.5, 0.5], requires_grad=True)
    loss = closure(lambda: w)(theta)
    fast = virtual_step(theta, loss.total, eta)
    (grad_w,) = torch.autograd.grad(closure(lambda: w)(fast, labeled_only=True).total, w)
    expect = 4 * eta * (2 * eta - 1)
    torch.testing.assert_close(grad_w, torch.tensor([expect, -expect]))
    assert torch.equal(theta["theta"], torch.zeros(2))  # the virtual step changed nothing in place

    torch.manual_seed(0)
    net = build_meta_net(2, 8)
    inputs = torch.tensor([[4.0, 0.0], [0.0, 4.0]])  # what the meta-net sees of rows a and b
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = sample_weights(net, inputs).detach()
    meta_update(closure(lambda: sample_weights(net, inputs)), theta, eta, optimizer)
    after = sample_weights(net, inputs).detach()
    assert after[0] - after[1] > before[0] - before[1]
    assert torch.equal(theta["theta"], torch.zeros(2))


@pytest.mark.parametrize("ratio,unseen", [(0.0, 0), (0.3, 30), (0.5, 50)])
def test_class_mismatch_split_has_the_unseen_fraction(blobs, ratio, unseen):
    config = make_config(*blobs, f"data.class_mismatch.unseen_ratio={ratio}")
    data = build_data(config, torch.device("cpu"))
    hidden = data.y_hidden[data.unlabeled_idx]
    assert len(hidden) == 100 and int((hidden == -1).sum()) == unseen
    assert data.num_classes == 2 and bool((data.test_y >= 0).all())
    assert bool((data.y_hidden[data.labeled_idx] >= 0).all())


# --- diagnostics, checkpoints, configuration --------------------------------------------------------

def test_auroc_matches_a_pairwise_count():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    positive = torch.rand(40, generator=g) < 0.4
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    brute = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean()
    torch.testing.assert_close(auroc(scores, positive), brute)
    assert auroc(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([True, True, False])) == 1.0
    assert auroc(torch.tensor([0.1, 0.8, 0.9]), torch.tensor([True, False, False])) == 0.0
    assert torch.isnan(auroc(torch.rand(4), torch.ones(4, dtype=torch.bool)))


def test_pi_model_with_ds3l_trains_and_logs_weight_diagnostics(tmp_path, blobs):
    from ssltrain.tblog import read_tensorboard, scalar_values
    config = make_config(*blobs, "train.steps=10", "ds3l.meta_lr=0.01", plugins=["pi_model", "ds3l"])
    summary = train(config, tmp_path / "run")
    assert summary["steps"] == 10 and np.isfinite(summary["test_top1"])
    events = read_tensorboard(tmp_path / "run" / "tb")
    tags = events.PluginTagToContent("scalars")
    values = {t: [v for _, v in scalar_values(events, t)] for t in tags if t.startswith("ds3l/")}
    assert set(values) == {"ds3l/meta_loss", "ds3l/weight_seen", "ds3l/weight_unseen", "ds3l/weight_auroc"}
    assert all(len(v) == 2 for v in values.values())  # log steps 5 and 10
    assert all(0 < v < 1 for name in ("ds3l/weight_seen", "ds3l/weight_unseen", "ds3l/weight_auroc")
               for v in values[name])
    # at each evaluation, the same statistics over the unlabeled set (eval/ in TensorBoard, final_eval in the summary)
    final = {k: v for k, v in summary["final_eval"].items() if k.startswith("ds3l/")}
    assert set(final) == {"ds3l/weight_seen", "ds3l/weight_unseen", "ds3l/weight_auroc"}
    assert all(0 < v < 1 for v in final.values()) and "eval/ds3l/weight_auroc" in tags


def test_weight_stats_only_report_what_is_defined():
    w = torch.tensor([0.2, 0.4, 0.9])
    both = weight_stats(w, torch.tensor([False, False, True]))
    assert both["ds3l/weight_seen"] == pytest.approx(0.9) and both["ds3l/weight_unseen"] == pytest.approx(0.3)
    assert both["ds3l/weight_auroc"] == 1.0
    assert set(weight_stats(w, torch.ones(3, dtype=torch.bool))) == {"ds3l/weight_seen"}


def test_mixmatch_with_ds3l_trains(tmp_path):
    config = make_config("train.steps=4", "mixmatch.rampup_steps=0", plugins=["mixmatch", "ds3l"])
    trainer = Trainer(config, tmp_path / "run")
    batch, ctx, closure = first_step(trainer)
    result = optimizer_step(trainer, ctx, closure)
    assert result.loss.weights.shape == (batch.x_u.shape[0],) == (2 * 32,)  # K views of each unlabeled row
    assert any(bool((g != 0).any()) for g in meta_grads(trainer))
    assert np.isfinite(trainer.fit()["test_top1"])


def test_meta_net_and_its_optimizer_survive_a_resume(tmp_path):
    def config(steps):
        return make_config(f"train.steps={steps}", "ds3l.meta_lr=0.01", "pi_model.rampup_steps=0",  # not 40% of steps
                           plugins=["pi_model", "ds3l"])

    train(config(20), tmp_path / "straight")
    train(config(10), tmp_path / "resumed")
    train(config(20), tmp_path / "resumed", resume=True)
    a, b = (checkpoint.load(tmp_path / run / "checkpoints" / "last.pt") for run in ("straight", "resumed"))
    assert a["plugins"]["ds3l"]["meta_optimizer"]["state"][0]["step"] == 20
    for key, part in (("meta_net", None), ("meta_optimizer", "state")):
        saved_a, saved_b = a["plugins"]["ds3l"][key], b["plugins"]["ds3l"][key]
        torch.testing.assert_close(saved_a[part] if part else saved_a, saved_b[part] if part else saved_b,
                                   rtol=0, atol=0)
    torch.testing.assert_close(a["model"], b["model"], rtol=0, atol=0)


def test_configure_rejects_fp16_and_ds3l_alone(tmp_path):
    with pytest.raises(ConfigError, match="amp=bf16"):
        trainer_for(tmp_path, "train.amp=fp16")
    with pytest.raises(ConfigError, match=r"plugins: \[pi_model, ds3l\]"):
        trainer_for(tmp_path, plugins=("ds3l",))


def test_fashion_mnist_configs_name_a_six_seen_class_split():
    paths = sorted(CONFIGS.glob("fashion_mnist_mismatch_*.yaml")) + sorted(CONFIGS.glob("ds3l_*.yaml"))
    assert paths
    for path in paths:
        raw = load_yaml(path)
        config = make_config(**raw)
        mismatch = config.data.class_mismatch
        assert config.data.name == "fashion_mnist" and mismatch.name != "custom", path
        assert len(mismatch.seen_classes) == 6, path
