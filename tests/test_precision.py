"""Every installed plugin trains the same step under bf16 autocast as in float32 (issue 16).

For each plugin of `discover()` (so plugins installed later are covered too): two trainers from the same
seed, one with `train.amp=bf16` and one without, take the same step (same batch, augmentations and random
draws) from the same state on the CPU. The parameter updates (plain SGD: the negative gradient, through the
plugin's own `ssl_optimizer_step` where it has one) must point the same way, and so must the gradients of
the plugin's own loss terms alone (so that a broken unlabeled term cannot hide behind the supervised one).
The step is taken past every ramp-up, where the unlabeled terms have their full weight.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_config
from ssltrain import rng
from ssltrain.loop import Trainer
from ssltrain.plugins import discover

MIN_COSINE = 0.9
STEPS = 100_000  # the compared step is the last one: every ramp-up is over

IMAGES = ("data.name=synthetic", "data.options={n_train: 64, n_test: 8, shape: [1, 8, 8], num_classes: 4}",
          "model.name=small_cnn", "model.options={width: 4}")

#: plugin -> (plugins list, overrides) where the defaults (the plugin alone on tiny images) do not fit
SETTINGS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "ds3l": (["pi_model", "ds3l"], IMAGES),  # weights the unlabeled terms of another plugin
    "ns3l": (["ns3l"], (*IMAGES, "ns3l.threshold=0.2")),  # T < 1/C = 0.25 that a fresh model's rows cross
    "flowgmm": (["flowgmm"], ()),  # a flow: the tiny two-moons vectors
    "sla": (["sla"], (*IMAGES, "sla.sd=true")),  # with its self-distillation terms
    # fixed confidence thresholds (0.95, 0.8) that a fresh model's rows never reach: at 1/C = 0.25 every row is kept
    **{name: ([name], (*IMAGES, f"{name}.threshold=0.25")) for name in ("fixmatch", "pseudo_label", "uda")},
}


def config_for(name: str, amp: str):
    plugins, overrides = SETTINGS.get(name, ([name], IMAGES))
    return make_config(*overrides, f"train.steps={STEPS}", f"train.amp={amp}", "optim.name=sgd", "optim.lr=0.1",
                       "optim.momentum=0", plugins=plugins)


def one_step(name: str, amp: str, classes: dict) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The parameter update of the last step, the gradient of the plugins' own terms (None without terms)
    and the terms' values, for one precision."""
    trainer = Trainer(config_for(name, amp), "unused", classes)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    step = STEPS - 1
    rng.seed_everything(0)
    ctx, batch = trainer.context(step), trainer.draw(step)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    closure = trainer.make_closure(batch, ctx)
    rng.seed_everything(1)
    loss = closure()
    own = [v for k, v in loss.reduced.items() if k != "supervised"]
    terms_grad = None
    if own and any(v.requires_grad for v in own):
        grads = torch.autograd.grad(sum(own), params, allow_unused=True)
        terms_grad = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    values = {k: float(v.detach()) for k, v in loss.reduced.items()}
    before = [p.detach().clone() for p in params]
    rng.seed_everything(1)
    trainer.hook.ssl_optimizer_step(closure=closure, model=trainer.model, optimizer=trainer.optimizer,
                                    scaler=trainer.scaler, ctx=ctx)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    return update, terms_grad, values


def cosines(name: str, classes: dict | None = None) -> tuple[float, float | None, dict]:
    """cos(update bf16, update fp32), cos(own terms' gradient bf16, fp32) and the fp32 terms' values."""
    classes = classes or discover()
    u16, g16, _ = one_step(name, "bf16", classes)
    u32, g32, values = one_step(name, "none", classes)
    cos_update = torch.nn.functional.cosine_similarity(u16, u32, dim=0).item()
    cos_terms = None if g32 is None else torch.nn.functional.cosine_similarity(g16, g32, dim=0).item()
    return cos_update, cos_terms, values


@pytest.mark.parametrize("name", sorted(discover()))
def test_bf16_step_points_where_the_float32_step_does(name):
    cos_update, cos_terms, values = cosines(name)
    own = 'none' if cos_terms is None else f'{cos_terms:.4f}'
    print(f"{name}: cosine of the updates {cos_update:.4f}, of its own terms' gradients {own}")  # pytest -s
    assert cos_update >= MIN_COSINE, f"{name}: update cosine {cos_update:.4f} (terms {values})"
    own = {k: v for k, v in values.items() if k != "supervised"}
    if cos_terms is not None:
        assert any(v != 0 for v in own.values()), f"{name}: every own term is 0, the check would be empty: {own}"
        assert cos_terms >= MIN_COSINE, f"{name}: cosine of its own terms' gradients {cos_terms:.4f} ({own})"


# --- bad input: values that cannot work in float32 are startup errors naming key, value and bound ---------------

def test_vat_xi_below_float32_resolution_is_a_startup_error():
    from ssltrain import ConfigError
    from ssltrain_plugins.vat import FLOAT32_EPS, normalize_rows
    x = torch.linspace(1, 3, 784).view(1, -1)
    d = normalize_rows(torch.randn(1, 784))
    assert torch.equal(x + 0.9 * FLOAT32_EPS * d, x) and not torch.equal(x + 20 * FLOAT32_EPS * d, x)
    with pytest.raises(ConfigError, match=r"vat\.xi=1e-08 is below float32's resolution 2\^-23 = 1\.19e-07"):
        Trainer(make_config("vat.xi=1e-8", plugins=["vat"]), "unused")
    Trainer(make_config("vat.xi=1e-6", plugins=["vat"]), "unused")  # the official value passes


def test_mixmatch_temperature_that_underflows_the_guess_is_a_startup_error():
    from ssltrain import ConfigError
    from ssltrain_plugins.mixmatch import min_temperature, sharpen
    bound = min_temperature(4)
    uniform = torch.full((1, 4), 0.25)
    assert torch.isfinite(sharpen(uniform, 1.01 * bound)).all() and torch.isnan(sharpen(uniform, 0.5 * bound)).all()
    with pytest.raises(ConfigError, match=r"mixmatch\.T=0\.01 is below 0\.01587 = ln\(C\) / 87\.3 for C = 4"):
        Trainer(make_config(*IMAGES, "mixmatch.T=0.01", plugins=["mixmatch"]), "unused")
    with pytest.raises(ConfigError, match=r"remixmatch\.T=0\.01 is below 0\.01587"):  # the same sharpening
        Trainer(make_config(*IMAGES, "remixmatch.T=0.01", plugins=["remixmatch"]), "unused")


@pytest.mark.parametrize("override", ["vat.weight=.inf", "pi_model.weight=.nan", "mixmatch.lambda_u=.inf"])
def test_infinite_or_nan_settings_are_rejected(override):
    from ssltrain import ConfigError
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: Input should be a finite number"):
        make_config(override, plugins=[override.split(".")[0]])
