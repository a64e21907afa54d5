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
from ssltrain_plugins.flows import (ConditionerResNet, ImageCoupling, ImageRealNVP, VectorRealNVP, inverse_logit,
                                    logit_with_logdet, squeeze, unsqueeze)

from conftest import make_config

SMALL = {"couplings": 2, "hidden": 16, "mean_scale": 4.0, "means": "opposite", "consistency_weight": 0.0}


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


def test_conditioner_output_is_the_sum_of_its_skip_convs():
    """resnet.py:65-82 (before 5c1bc3b): out = out_conv(relu(out_norm(in_skip(h0) + sum_i skip_i(h_i)))), h_i the
    i-th block's output: the residual trunk reaches the output only through the 1x1 skip convs."""
    net = perturbed(ConditionerResNet(2, 6, 4, blocks=3, double_after_norm=True))
    assert [tuple(c.weight.shape) for c in [net.in_skip, *net.skips]] == [(6, 6, 1, 1)] * 4
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        for conv in [net.in_skip, *net.skips]:
            conv.parametrizations.weight.original0.zero_()
            conv.bias.zero_()
        constant = net(x)
        torch.testing.assert_close(constant, constant[:1].expand_as(constant))  # no skip: the input is lost
        net.skips[1].parametrizations.weight.original0.fill_(1.0)  # only block 2's skip: blocks 1-2 matter, 3 not
        before = net(x)
        net.blocks[2].body[2].parametrizations.weight.original1.mul_(3.0).add_(1.0)
        torch.testing.assert_close(net(x), before)
        net.blocks[1].body[2].parametrizations.weight.original1.mul_(3.0).add_(1.0)
        assert not torch.allclose(net(x), before)


def test_coupling_widths_double_after_the_first_three():
    """realnvp.py:43-65: mid channels for the first scale's 3 checkerboard couplings, 2 mid for its 3
    channel-wise couplings and the last scale's 4 (the paper's 64/128); doubled again per extra scale."""
    def widths(flow):
        return [m.net.in_conv.weight.shape[0] for m in flow.modules() if isinstance(m, ImageCoupling)]
    assert widths(ImageRealNVP((1, 8, 8), scales=2, mid=4, blocks=1)) == [4] * 3 + [8] * 7
    assert widths(ImageRealNVP((1, 8, 8), scales=3, mid=4, blocks=1)) == [4] * 3 + [8] * 6 + [16] * 7
    assert all(len(m.net.blocks) == 2 for m in ImageRealNVP((1, 4, 4), 2, 2, 2).modules()
               if isinstance(m, ImageCoupling))


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
    b = fg.make_means(10, 50, "balanced", 2.0, g())  # equal norms 2 sqrt(D), orthogonal
    torch.testing.assert_close(b @ b.T, 4.0 * 50 * torch.eye(10), atol=1e-3, rtol=0)


def test_balanced_means_favour_no_class_at_initialisation():
    """Logit images have a mean latent far from 0: random N(0, I) means then send most rows to the one mean
    nearest that point. Balanced means (same pairwise distances, equal norms) are centred on the first
    training batch's mean latent, once: every class gets about a tenth of the predictions."""
    dim, classes = 64, 10
    g = torch.Generator().manual_seed(0)
    x = 3.0 + torch.randn(dim, generator=g) + 0.5 * torch.randn(2000, dim, generator=g)  # offset + spread

    def shares(init):
        means = fg.make_means(classes, dim, init, 1.0, torch.Generator().manual_seed(1))
        model = fg.FlowGMMModel(VectorRealNVP(dim, 2, 8), means, image=False, centre_on_data=init == "balanced")
        model.train()(x[:64])  # the first training batch (the flow starts as the identity)
        with torch.no_grad():
            pred = model.eval()(x)["logits"].argmax(1)
        return torch.bincount(pred, minlength=classes) / len(x), model

    random_shares, _ = shares("random")
    balanced_shares, model = shares("balanced")
    assert random_shares.max() > 0.5 and balanced_shares.max() < 0.2 and balanced_shares.min() > 0.03
    centred = model.means.clone()
    initial = fg.make_means(classes, dim, "balanced", 1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(centred - initial, x[:64].mean(0).expand_as(centred))
    dists = torch.pdist(centred)
    torch.testing.assert_close(dists, torch.full_like(dists, math.sqrt(2 * dim)))  # as N(0, I) means, on average
    model.train()(x[64:128])
    assert bool(model.means_centred) and torch.equal(model.means, centred)  # once
    restored = fg.FlowGMMModel(VectorRealNVP(dim, 2, 8), torch.zeros(classes, dim), image=False, centre_on_data=True)
    restored.load_state_dict(model.state_dict())
    restored.train()(x[:64])
    torch.testing.assert_close(restored.means, centred)  # a resumed run does not centre again


def official_nll_terms(model, x, y2=None):
    """From z = f(x) and log|det J| directly (not through the plugin's helpers): per row
    -log p(x) (the mixture) and, given targets y2, -log N(f(x); mu_y2, I) - log|det J| (flow_loss.py:20-32)."""
    z, logdet = model.latent(x)
    log_n = torch.stack([torch.distributions.MultivariateNormal(m, torch.eye(len(m))).log_prob(z) for m in model.means], 1)
    nll = -(torch.logsumexp(log_n + model.log_prior, 1) + logdet)
    return nll if y2 is None else (nll, -(log_n.gather(1, y2[:, None])[:, 0] + logdet))


def step_loss(trainer, step):
    batch, ctx = trainer.draw(step), trainer.context(step)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    return batch, trainer.make_closure(batch, ctx)()


def test_image_code_loss_form_one_likelihood_mean_over_all_rows(tmp_path):
    """train_semisup_cons.py:89-102: 3 CE(labeled) + mean NLL over ALL rows + w_cons * mean NLL(x1 | y2) over
    all rows, y2 = argmax of a no-grad forward of the other view; the ramp min((step + 1) / R, 1)."""
    config = make_config(plugins=["flowgmm"], flowgmm={**SMALL, "consistency_weight": 2.0,
                                                         "consistency_rampup_steps": 4})
    trainer = Trainer(config, tmp_path)
    batch, loss = step_loss(trainer, step=1)
    n_l, n_u = batch.x_l.shape[0], batch.x_u.shape[0]
    assert (n_l, n_u) == (16, 32)
    model, out = trainer.model, loss.outputs
    x1 = torch.cat([batch.x_l, batch.x_u])
    with torch.no_grad():
        y2 = model(torch.cat([batch.extras["flowgmm/view2_l"], batch.extras["flowgmm/view2_u"]]))["logits"].argmax(1)
    nll, nll_cons = official_nll_terms(model, x1, y2)
    ce = F.cross_entropy(out.logits_l, batch.y_l)
    ramp = min((1 + 1) / 4, 1.0)
    official = 3.0 * ce + nll.mean() + 2.0 * ramp * nll_cons.mean()
    torch.testing.assert_close(loss.total, official)
    # the ratio of terms: the likelihood of the labeled rows carries n_l / (n_l + n_u) = 1/3 of its mean against
    # the CE mean, the unlabeled rows 2/3 (the old form, 3 CE + NLL_L + NLL_U, gave each set a full weight)
    assert loss.reduced["flowgmm/nll"].item() == pytest.approx(n_u / (n_l + n_u) * nll[n_l:].mean().item(), rel=1e-5)
    old_form = 3.0 * ce + nll[:n_l].mean() + nll[n_l:].mean()
    assert (old_form - nll.mean()).abs() > 0.1 * nll.abs().mean()


def test_tabular_code_loss_form_per_set_means(tmp_path):
    """train_semisup_flowgmm_tabular.py:65-73 (HEAD): mean_L -log p(x, y) + a * mean_U -log p(x)."""
    config = make_config(plugins=["flowgmm"], flowgmm={**SMALL, "likelihood_mean": "per_set", "label_weight": 1.0,
                                                         "unlabeled_weight": 0.6})
    trainer = Trainer(config, tmp_path)
    batch, loss = step_loss(trainer, step=0)
    nll = official_nll_terms(trainer.model, torch.cat([batch.x_l, batch.x_u]))
    n_l = batch.x_l.shape[0]
    z, logdet = trainer.model.latent(batch.x_l)
    log_joint = -0.5 * (z - trainer.model.means[batch.y_l]).pow(2).sum(1) - math.log(2 * math.pi) + logdet - math.log(2)
    official = -log_joint.mean() + 0.6 * nll[n_l:].mean()
    torch.testing.assert_close(loss.total, official)


def test_flowgmm_sup_is_labeled_rows_only(tmp_path):
    """unlabeled_weight 0 (FlowGMM-Sup): no unlabeled rows drawn; 3 CE + the labeled rows' NLL mean."""
    trainer = Trainer(make_config(plugins=["flowgmm"], flowgmm={**SMALL, "unlabeled_weight": 0.0}), tmp_path)
    assert not trainer.uses_unlabeled
    batch, loss = step_loss(trainer, step=0)
    assert batch.x_u.shape[0] == 0 and loss.terms == []
    ce = F.cross_entropy(loss.outputs.logits_l, batch.y_l)
    torch.testing.assert_close(loss.total, 3.0 * ce + official_nll_terms(trainer.model, batch.x_l).mean())


def test_consistency_ramp_is_the_official_one_in_steps():
    plugin = fg.FlowGMM(fg.FlowGMM.Config(consistency_weight=1.0, consistency_rampup_steps=100))
    assert [plugin.consistency_ramp(s) for s in (0, 49, 99, 500)] == [0.01, 0.5, 1.0, 1.0]
    assert fg.FlowGMM(fg.FlowGMM.Config(consistency_weight=1.0)).consistency_ramp(0) == 1.0  # script default: no ramp


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
    with pytest.raises(ConfigError, match="'balanced' needs at most 2 classes"):
        fg.FlowGMM(fg.FlowGMM.Config(means="balanced")).ssl_build_model(config, 3, (2,))
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


def test_fashion_mnist_sup_config_differs_only_in_the_unlabeled_weight():
    """FlowGMM-Sup is a proper arm of the benchmark: the FlowGMM config with no unlabeled rows, nothing else."""
    from pathlib import Path
    from ssltrain.config import load_yaml
    configs = Path(__file__).parents[1] / "configs"
    full, sup = (load_yaml(configs / f"flowgmm{s}_fashion_mnist.yaml") for s in ("", "_sup"))
    assert (full["flowgmm"].pop("unlabeled_weight"), sup["flowgmm"].pop("unlabeled_weight")) == (1.0, 0.0)
    assert full == sup
