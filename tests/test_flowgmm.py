"""FlowGMM (methods.md 4g): flow invertibility and log-determinants, the latent GMM math, the losses,
the startup checks, the pictures, and a tiny two-moons run with a checkpoint round trip."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ssltrain import ConfigError, PluginConflictError, SSLPlugin, hookimpl
from ssltrain import checkpoint
from ssltrain.defaults import split_rows
from ssltrain.loop import Trainer
from ssltrain.plugins import discover
from ssltrain.types import StepContext
from ssltrain_plugins import flowgmm as fg
from ssltrain_plugins.flows import (ImageRealNVP, VectorRealNVP, inverse_logit, logit_with_logdet, squeeze,
                                    unsqueeze)

from conftest import make_config

SMALL = {"couplings": 2, "hidden": 16, "mean_scale": 4.0, "means": "opposite"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids oversubscribing the shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(flow: torch.nn.Module) -> torch.nn.Module:
    """The flow in float64 eval mode with every parameter moved off its (identity) initialisation."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow.double().eval()


def gmm_model(dim=4, classes=3) -> fg.FlowGMMModel:
    means = fg.make_means(classes, dim, "random", 2.0, torch.Generator().manual_seed(1))
    return fg.FlowGMMModel(perturbed(VectorRealNVP(dim, 4, 16)), means.double(), image=False).double()


def jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """slogdet of the autograd Jacobian of fn (one flattened row -> flattened output), per row."""
    rows = [torch.autograd.functional.jacobian(lambda v: fn(v.view(1, *x.shape[1:])).reshape(-1), r.reshape(-1),
                                               vectorize=True) for r in x]
    return torch.stack([torch.linalg.slogdet(j)[1] for j in rows])


@pytest.mark.parametrize("flow, shape", [(lambda: VectorRealNVP(4, 4, 16), (4,)),
                                         (lambda: ImageRealNVP((1, 4, 4), scales=2, mid=4, blocks=1), (1, 4, 4))])
def test_flow_inverts_and_logdet_matches_autograd_jacobian(flow, shape):
    f = perturbed(flow())
    x = torch.randn(2, *shape, dtype=torch.float64)
    z, logdet = f(x)
    assert z.shape == (2, math.prod(shape))
    assert ((f.inverse(z).reshape(x.shape) - x).norm() / x.norm()).item() < 1e-4
    torch.testing.assert_close(logdet, jacobian_logdet(lambda v: f(v)[0], x), atol=1e-4, rtol=0)


def test_image_flow_shapes_and_squeeze():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(unsqueeze(squeeze(x)), x)
    f = ImageRealNVP((1, 8, 8), scales=3, mid=4, blocks=1).eval()
    assert f(torch.randn(2, 1, 8, 8))[0].shape == (2, 64)
    with pytest.raises(ValueError, match="divisible by 4"):
        ImageRealNVP((1, 6, 6), scales=3)


def test_logit_layer_logdet_and_inverse():
    u = torch.rand(4, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    y, logdet = logit_with_logdet(u)
    (dy_du,) = torch.autograd.grad(y.sum(), u)  # elementwise map: the Jacobian is diagonal
    torch.testing.assert_close(logdet, dy_du.abs().log().flatten(1).sum(1))
    torch.testing.assert_close(inverse_logit(y.detach()), u.detach())


def test_isotropic_density_matches_torch_distributions():
    z, means, sigma = torch.randn(5, 3), torch.randn(4, 3), torch.tensor([0.5, 1.0, 2.0, 1.3])
    ours = fg.isotropic_log_density(z, means, sigma)
    ref = torch.stack([torch.distributions.MultivariateNormal(m, s ** 2 * torch.eye(3)).log_prob(z)
                       for m, s in zip(means, sigma)], 1)
    torch.testing.assert_close(ours, ref)


def test_posterior_sums_to_one_is_nearest_mean_and_follows_the_means():
    model, x = gmm_model(), torch.randn(6, 4, dtype=torch.float64)
    post = model(x)["logits"].exp()
    torch.testing.assert_close(post.sum(1), torch.ones(6, dtype=torch.float64))
    z = model.latent(x)[0]
    assert torch.equal(post.argmax(1), torch.cdist(z, model.means).argmin(1))
    model.means[[0, 2]] = model.means[[2, 0]].clone()
    torch.testing.assert_close(model(x)["logits"].exp(), post[:, [2, 1, 0]])


def test_joint_likelihood_identities():
    model, x, y = gmm_model(), torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    out = model(x)
    z, logdet = model.latent(x)
    direct = model.log_prior + fg.isotropic_log_density(z, model.means, model.sigma) + logdet[:, None]  # log p(x, k)
    torch.testing.assert_close(fg.joint_log_likelihood(out["logits"], out["log_px"], y), direct.gather(1, y[:, None])[:, 0])
    torch.testing.assert_close(torch.logsumexp(direct, 1), out["log_px"])


def test_consistency_target_and_conditional_nll():
    model, x = gmm_model(), torch.randn(6, 4, dtype=torch.float64)
    out = model(x)
    target = fg.consistency_target(out["logits"])
    assert out["logits"].requires_grad and not target.requires_grad and target.dtype == torch.long
    assert torch.equal(target, out["logits"].argmax(1))
    z, logdet = model.latent(x)
    log_n = fg.isotropic_log_density(z, model.means, model.sigma).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(fg.conditional_nll(out["logits"], out["log_px"], target, model.log_prior),
                               -(log_n + logdet))


def test_bits_per_dim():
    dim = 12
    # the uniform density on [0, 1)^D (log p = 0) is 8 bits per 8-bit dimension
    torch.testing.assert_close(fg.bits_per_dim(torch.zeros(2), dim, 256), torch.full((2,), 8.0))
    # a continuous density of 2^-D: 1 bit per dimension, no dequantization constant
    torch.testing.assert_close(fg.bits_per_dim(torch.full((2,), -dim * math.log(2)), dim, 1), torch.ones(2))
    log_px = torch.randn(3, requires_grad=True)
    grads = [torch.autograd.grad(fg.bits_per_dim(log_px, dim, bins).sum(), log_px)[0] for bins in (1, 256)]
    torch.testing.assert_close(grads[0], grads[1])  # the D log 256 constant changes no gradient


def test_make_means():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    m = fg.make_means(2, 5, "opposite", 7.5, g())
    torch.testing.assert_close(m[0], -m[1])
    assert abs((m[0] - m[1]).norm().item() - 7.5) < 1e-5
    r = fg.make_means(10, 50, "random", 1.0, g())
    assert r.shape == (10, 50) and torch.equal(r, fg.make_means(10, 50, "random", 1.0, g()))
    torch.testing.assert_close(fg.make_means(2, 2, "opposite", 4.0, g(), direction=[0.0, 3.0]),
                               torch.tensor([[0.0, 2.0], [0.0, -2.0]]))


def ctx_for(trainer: Trainer, step: int = 0) -> StepContext:
    return trainer.context(step)


def test_losses_per_row(tmp_path):
    config = make_config(plugins=["flowgmm"], flowgmm={**SMALL, "consistency_weight": 2.0,
                                                         "consistency_rampup_steps": 4, "label_weight": 3.0,
                                                         "unlabeled_rampup_steps": 2})
    trainer = Trainer(config, tmp_path)
    batch, ctx = trainer.draw(0), ctx_for(trainer, step=1)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    loss = trainer.make_closure(batch, ctx)()
    out = loss.outputs
    ce = F.cross_entropy(out.logits_l, batch.y_l, reduction="none")
    torch.testing.assert_close(loss.supervised, 3.0 * ce - out.extras_l["log_px"])
    terms = {t.name: t for t in loss.terms}
    assert set(terms) == {"flowgmm/nll", "flowgmm/consistency"}
    torch.testing.assert_close(terms["flowgmm/nll"].per_sample, -out.extras_u["log_px"])
    assert terms["flowgmm/consistency"].per_sample.shape == (batch.x_u.shape[0],)
    assert terms["flowgmm/consistency"].weight == pytest.approx(2.0 * 1 / 4)
    assert terms["flowgmm/nll"].weight == pytest.approx(1 / 2)
    # label_weight 1 gives the paper's joint objective: -log p(x, y) per labeled row
    plugin = trainer.pm.get_plugin("flowgmm")
    plugin.config.label_weight = 1.0
    split = split_rows(trainer.model(torch.cat([batch.x_l, batch.x_u])), batch.x_l.shape[0])
    torch.testing.assert_close(plugin.ssl_supervised_loss(split, batch),
                               -fg.joint_log_likelihood(split.logits_l, split.extras_l["log_px"], batch.y_l))


def test_labeled_only_draws_no_unlabeled_rows(tmp_path):
    trainer = Trainer(make_config(plugins=["flowgmm"], flowgmm={**SMALL, "unlabeled_weight": 0.0}), tmp_path)
    assert not trainer.uses_unlabeled and trainer.draw(0).x_u.shape[0] == 0


class FakeSLA(SSLPlugin):
    """Stands in for SLA (no hooks needed: the check is by plugin name)."""


class OtherOwner(SSLPlugin):
    @hookimpl
    def ssl_build_model(self):
        return torch.nn.Linear(2, 2)


def test_startup_errors(tmp_path):
    with pytest.raises(ConfigError, match="'flowgmm' and 'sla' cannot run together: .*no linear head"):
        Trainer(make_config(classes={"sla": FakeSLA}, plugins=["flowgmm", "sla"]), tmp_path,
                {**discover(), "sla": FakeSLA})
    with pytest.raises(PluginConflictError, match="ssl_build_model"):
        Trainer(make_config(classes={"own": OtherOwner}, plugins=["flowgmm", "own"]), tmp_path,
                {**discover(), "own": OtherOwner})
    config = make_config("data.normalize=true", plugins=["flowgmm"])
    plugin = fg.FlowGMM(config.plugin("flowgmm"))
    with pytest.raises(ConfigError, match="data.normalize: false"):
        plugin.ssl_build_model(config, 10, (1, 8, 8))
    with pytest.raises(ConfigError, match="'opposite' needs 2 classes"):
        fg.FlowGMM(fg.FlowGMM.Config(means="opposite")).ssl_build_model(config, 3, (2,))
    with pytest.raises(ConfigError, match="mean_direction: needs 2 values"):
        fg.FlowGMM(fg.FlowGMM.Config(means="opposite", mean_direction=[1, 0, 0])).ssl_build_model(config, 2, (2,))


class RecordingLogger:
    def __init__(self):
        self.images, self.values = {}, {}

    def image(self, tag, image, step):
        self.images[tag] = image

    def scalars(self, values, step):
        self.values.update(values)


def test_two_moons_training_pictures_and_checkpoint_round_trip(tmp_path):
    config = make_config("train.steps=12", "train.eval_every=6", plugins=["flowgmm"],
                         flowgmm={**SMALL, "consistency_weight": 1.0})
    trainer = Trainer(config, tmp_path / "a")
    summary = trainer.fit()  # raises NonFiniteLossError on a non-finite loss
    assert summary["steps"] == 12 and 0 <= summary["test_top1"] <= 100
    logger, metrics = RecordingLogger(), {}
    trainer.hook.ssl_evaluate_end(model=trainer.model, data=trainer.data, prepare=lambda x: x, metrics=metrics, step=12,
                                  logger=logger)
    assert trainer.model.training  # restored after the pictures
    assert {k: tuple(v.shape) for k, v in logger.images.items()} == {
        "flowgmm/class_regions": (3, 256, 256), "flowgmm/latent_space": (3, 256, 256)}
    assert math.isfinite(metrics["flowgmm/bpd"]) and summary["final_eval"]["flowgmm/bpd"] > 0

    restored = Trainer(config, tmp_path / "b")
    restored.load_state_dict(checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt"))
    x = trainer.data.test_x[:50]
    trainer.model.eval(), restored.model.eval()
    with torch.no_grad():
        a, b = trainer.model(x), restored.model(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(restored.model.means, trainer.model.means)


def test_image_class_samples_are_logged():
    model = fg.FlowGMMModel(ImageRealNVP((1, 4, 4), scales=2, mid=4, blocks=1),
                            fg.make_means(3, 16, "random", 1.0, torch.Generator().manual_seed(0)), image=True)
    data = SimpleNamespace(test_x=torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8), input_shape=(1, 4, 4),
                           num_classes=3)
    plugin = fg.FlowGMM(fg.FlowGMM.Config())
    plugin.dim, plugin.num_bins = 16, 256
    logger, metrics = RecordingLogger(), {}
    plugin.ssl_evaluate_end(model=model, data=data, metrics=metrics, step=1, logger=logger)
    grid = logger.images["flowgmm/class_samples"]
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1
    assert metrics["flowgmm/bpd"] > 0
