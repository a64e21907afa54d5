import copy

import pytest
import torch
from torch import nn

from ssltrain.models import (
    BACKBONES,
    MLP,
    ResNet32,
    SmallCNN,
    WideResNet,
    _PadShortcut,
    build_backbone,
)

# (name, input_shape, options, expected feature_dim); small inputs keep tests fast.
CASES = [
    ("mlp", (2,), {}, 128),
    ("mlp", (1, 6, 6), {"hidden": (16,), "dropout": 0.5}, 16),
    ("small_cnn", (1, 28, 28), {"width": 8}, 32),
    ("small_cnn", (3, 32, 32), {"dropout": 0.5}, 128),
    ("wrn", (3, 16, 16), {"depth": 10, "widen_factor": 1, "dropout": 0.3}, 64),
    ("wrn28_2", (3, 8, 8), {}, 128),
    ("resnet32", (3, 8, 8), {}, 64),
]
IDS = [f"{name}-{'x'.join(map(str, shape))}" for name, shape, _, _ in CASES]
CNN_CASES = [c for c in CASES if c[0] != "mlp"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name,shape,options,feature_dim", CASES, ids=IDS)
def test_shapes_and_contract(name, shape, options, feature_dim):
    model = build_backbone(name, 5, shape, **options).eval()
    x = torch.randn(3, *shape)
    assert model.feature_dim == feature_dim
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (feature_dim, 5)
    feats = model.features(x)
    assert feats.shape == (3, feature_dim)
    logits = model(x)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(logits, model.head(feats))


@pytest.mark.parametrize("name,shape,options,feature_dim", CASES, ids=IDS)
def test_replacing_head_changes_output(name, shape, options, feature_dim):
    model = build_backbone(name, 5, shape, **options)
    model.head = nn.Linear(model.feature_dim, 3)
    assert model(torch.randn(2, *shape)).shape == (2, 3)


@pytest.mark.parametrize("name,shape,options,feature_dim", CASES, ids=IDS)
def test_train_and_eval_modes(name, shape, options, feature_dim):
    model = build_backbone(name, 4, shape, **options)
    x = torch.randn(4, *shape)
    bn_before = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    model.train()
    model(x).logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    bn_after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not torch.equal(a, b) for a, b in zip(bn_before, bn_after))

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))  # dropout off, BN frozen


def test_dropout_active_only_in_train_mode():
    model = MLP(4, 2, hidden=(64,), dropout=0.5)
    x = torch.randn(8, 4)
    assert not torch.equal(model.features(x), model.features(x))
    model.eval()
    assert torch.equal(model.features(x), model.features(x))


@pytest.mark.parametrize("name,shape,options,feature_dim", CNN_CASES, ids=IDS[2:])
def test_channels_last_matches_contiguous(name, shape, options, feature_dim):
    model = build_backbone(name, 5, shape, **options).eval()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected)
        torch.testing.assert_close(
            model_cl(x.to(memory_format=torch.channels_last)), expected, atol=1e-4, rtol=1e-4
        )


def test_wrn28_2_params_bn_and_init():
    model = WideResNet(num_classes=10)
    assert n_params(model) == pytest.approx(1.47e6, rel=0.02)  # 1,467,610
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 12 + 1
    assert all(bn.momentum == 0.001 and bn.eps == 1e-3 for bn in bns)
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
    assert torch.all(model.head.bias == 0)
    shortcuts = [m.shortcut for m in model.body if hasattr(m, "shortcut")]
    assert sum(s is not None for s in shortcuts) == 3  # 16->32, 32->64 /2, 64->128 /2
    leaky = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert leaky and all(m.negative_slope == 0.1 for m in leaky)


def test_wrn_only_the_first_stage_shortcut_sees_the_preactivated_input():
    """google-research/mixmatch libml/models.py:88-105: activate_before_residual in stage 1 only; the 1x1
    shortcuts of stages 2 and 3 get the block's raw input."""
    torch.manual_seed(0)
    model = WideResNet(num_classes=10).train()
    assert n_params(model) == 1_467_610  # the structure changes what the shortcut sees, not the parameters
    blocks = [m for m in model.body if hasattr(m, "shortcut") and m.shortcut is not None]
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.setdefault(("in", m), a[0].clone())) for b in blocks]
    hooks += [b.shortcut.register_forward_pre_hook(lambda m, a: seen.setdefault(("sc", m), a[0].clone()))
              for b in blocks]
    model(torch.randn(4, 3, 16, 16))
    for h in hooks:
        h.remove()
    for stage, block in enumerate(blocks):
        x, got = seen[("in", block)], seen[("sc", block.shortcut)]
        with torch.no_grad():
            pre = block.act(nn.functional.batch_norm(x, None, None, block.bn1.weight, block.bn1.bias, True,
                                                      0.0, block.bn1.eps))
        expected = pre if stage == 0 else x
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(pre, x)  # the two inputs are distinguishable


def test_wrn_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(10, depth=27)


def test_resnet32_params_and_option_a_shortcut():
    model = ResNet32(num_classes=10)
    assert n_params(model) == pytest.approx(0.46e6, rel=0.02)  # 464,154
    assert model.feature_dim == 64
    pads = [m for m in model.modules() if isinstance(m, _PadShortcut)]
    assert len(pads) == 2
    assert all(n_params(p) == 0 for p in pads)
    x = torch.randn(1, 16, 8, 8)
    y = _PadShortcut(16)(x)
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert torch.all(y[:, 16:] == 0)


def test_small_cnn_defaults():
    model = SmallCNN(1, 10)
    assert model.feature_dim == 128
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.momentum == 0.1 for bn in bns)
    assert SmallCNN(1, 10, bn_momentum=0.01).body[1].momentum == 0.01


def test_build_backbone_registry_and_aliases():
    assert {"mlp", "small_cnn", "wrn", "wrn28_2", "resnet32"} <= set(BACKBONES)
    wrn = build_backbone("WRN28_2", 10, (3, 32, 32))
    assert isinstance(wrn, WideResNet)
    assert n_params(wrn) == n_params(build_backbone("wrn", 10, (3, 32, 32)))
    assert build_backbone("small_cnn", 10, (3, 32, 32)).body[0].in_channels == 3
    assert build_backbone("mlp", 10, (1, 4, 4)).body[1].in_features == 16


def test_build_backbone_errors():
    with pytest.raises(ValueError, match="valid names: .*resnet32.*wrn"):
        build_backbone("vgg", 10, (3, 32, 32))
    with pytest.raises(TypeError, match="widen"):
        build_backbone("resnet32", 10, (3, 32, 32), widen=2)
    with pytest.raises(TypeError, match="nope"):
        build_backbone("mlp", 10, (2,), nope=1)
    with pytest.raises(ValueError, match="input_shape"):
        build_backbone("small_cnn", 10, (784,))
