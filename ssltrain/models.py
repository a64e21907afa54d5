"""Backbone networks for semi-supervised training.

Contract shared by every backbone (plugins rely on it):

* ``model.feature_dim`` -- size of the penultimate representation.
* ``model.features(x) -> Tensor[N, feature_dim]`` -- penultimate features
  (after global average pooling for CNNs); dropout, if configured, is applied
  inside ``features`` and only in train mode.
* ``model.head`` -- ``nn.Linear(feature_dim, num_classes)``.
* ``model.forward(x) == model.head(model.features(x))`` -- logits
  ``[N, num_classes]``. ``forward`` always goes through ``self.head``, so a
  plugin may replace the head (any module taking ``[N, feature_dim]``) or wrap
  the model.

Inputs are ``[N, D]`` vectors for :class:`MLP` (any ``[N, ...]`` is flattened)
and ``[N, C, H, W]`` images for the CNNs, which accept any spatial size thanks
to global average pooling. All models work with ``channels_last``, AMP (bf16)
and ``torch.compile``; memory format and device are left to the caller.

Use :func:`build_backbone` to construct a model by name from :data:`BACKBONES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "MLP",
    "Backbone",
    "ResNet32",
    "SmallCNN",
    "WideResNet",
    "build_backbone",
]


class Backbone(nn.Module):
    """Base class: subclasses set ``body`` (input -> ``[N, feature_dim]``),
    ``feature_dim`` and ``head``."""

    body: nn.Module
    head: nn.Module
    feature_dim: int

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[N, feature_dim]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` = ``self.head(self.features(x))``."""
        return self.head(self.features(x))


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _pool_flatten() -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]


class MLP(Backbone):
    """``hidden`` blocks of Linear+ReLU(+Dropout); ``feature_dim = hidden[-1]``
    (``input_dim`` if ``hidden`` is empty). Inputs are flattened from dim 1."""

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        hidden: Sequence[int] = (128, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        dim = input_dim
        for width in hidden:
            layers += [nn.Linear(dim, width), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            dim = width
        self.body = nn.Sequential(*layers)
        self.feature_dim = dim
        self.head = nn.Linear(dim, num_classes)


class SmallCNN(Backbone):
    """Fast CNN for 28x28/32x32 images: conv3x3(w)-BN-LReLU, maxpool,
    conv3x3(2w)-BN-LReLU, maxpool, conv3x3(4w)-BN-LReLU, GAP (+dropout);
    ``feature_dim = 4 * width``. One conv per resolution keeps it CPU-friendly
    (doubling each stage costs ~3x the time)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 32,
        dropout: float = 0.0,
        bn_momentum: float = 0.1,
        leaky_slope: float = 0.1,
    ) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                _conv3x3(cin, cout),
                nn.BatchNorm2d(cout, momentum=bn_momentum),
                nn.LeakyReLU(leaky_slope, inplace=True),
            ]

        w = width
        layers = [
            *block(in_channels, w), nn.MaxPool2d(2),
            *block(w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *_pool_flatten(),
        ]  # fmt: skip
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.feature_dim = 4 * w
        self.head = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(
                    m.weight, a=leaky_slope, mode="fan_out", nonlinearity="leaky_relu"
                )


class _WRNBlock(nn.Module):
    """Pre-activation block: BN-LReLU-conv3x3-BN-LReLU-(dropout)-conv3x3, plus a shortcut (identity,
    or a 1x1 conv on a shape change). The shortcut receives the pre-activated input only with
    ``activate_before_residual`` (the first block of the first stage), the raw input otherwise, as in
    google-research/mixmatch libml/models.py:88-105 and google-research/fixmatch libml/models.py:72-89."""

    def __init__(
        self, cin: int, cout: int, stride: int, bn_momentum: float,
        leaky_slope: float, dropout: float, activate_before_residual: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-3, momentum=bn_momentum)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=bn_momentum)
        self.conv2 = _conv3x3(cout, cout)
        self.act = nn.LeakyReLU(leaky_slope, inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.activate_before_residual = activate_before_residual
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.act(self.bn2(out))))
        skip = pre if self.activate_before_residual else x
        return out + (skip if self.shortcut is None else self.shortcut(skip))


class WideResNet(Backbone):
    """WRN-depth-k as in MixMatch/FixMatch (default WRN-28-2, ~1.47M params).

    conv3x3(16), 3 stages of ``(depth - 4) / 6`` pre-activation blocks with
    widths 16k/32k/64k and strides 1/2/2 (only the first block's shortcut sees the
    pre-activated input: ``activate_before_residual``), final BN-LReLU, GAP;
    ``feature_dim = 64 * widen_factor``. BN uses momentum 0.001 (TF decay 0.999)
    and eps 1e-3. Init: conv kaiming-normal (fan_out, leaky_relu), BN 1/0,
    Linear xavier-normal with zero bias.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 2,
        in_channels: int = 3,
        bn_momentum: float = 0.001,
        leaky_slope: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers: list[nn.Module] = [_conv3x3(in_channels, 16)]
        cin = 16
        for stage, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
            for i in range(n):
                layers.append(
                    _WRNBlock(cin, width, stride if i == 0 else 1, bn_momentum,
                              leaky_slope, dropout, activate_before_residual=stage == 0 and i == 0)
                )  # fmt: skip
                cin = width
        layers += [
            nn.BatchNorm2d(cin, eps=1e-3, momentum=bn_momentum),
            nn.LeakyReLU(leaky_slope, inplace=True),
            *_pool_flatten(),
        ]
        self.body = nn.Sequential(*layers)
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(
                    m.weight, a=leaky_slope, mode="fan_out", nonlinearity="leaky_relu"
                )
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)


class _PadShortcut(nn.Module):
    """Parameter-free option-A shortcut: stride-2 subsample, zero-pad channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.extra))


class _BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            _conv3x3(cin, cout, stride),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            _conv3x3(cout, cout),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            _PadShortcut(cout - cin) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class ResNet32(Backbone):
    """CIFAR ResNet-32 (He et al. 2016, ~0.46M params): conv3x3(16)-BN-ReLU,
    3 stages x 5 basic blocks (widths 16/32/64, strides 1/2/2, option-A
    shortcuts), GAP; ``feature_dim = 64``."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            _conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        ]  # fmt: skip
        cin = 16
        for width, stride in zip((16, 32, 64), (1, 2, 2)):
            for i in range(5):
                layers.append(_BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.body = nn.Sequential(*layers, *_pool_flatten())
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _build_mlp(num_classes: int, input_shape: tuple[int, ...], **options) -> MLP:
    return MLP(math.prod(input_shape), num_classes, **options)


def _image_builder(cls: type[Backbone], **defaults) -> Callable[..., Backbone]:
    def build(num_classes: int, input_shape: tuple[int, ...], **options) -> Backbone:
        if len(input_shape) != 3:
            raise ValueError(
                f"{cls.__name__} needs image input_shape (C, H, W), got {input_shape}"
            )
        return cls(
            num_classes=num_classes, in_channels=input_shape[0], **{**defaults, **options}
        )

    return build


#: name -> ``constructor(num_classes, input_shape, **options)``.
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "mlp": _build_mlp,
    "small_cnn": _image_builder(SmallCNN),
    "wrn": _image_builder(WideResNet),
    "wrn28_2": _image_builder(WideResNet, depth=28, widen_factor=2),
    "resnet32": _image_builder(ResNet32),
}


def build_backbone(
    name: str, num_classes: int, input_shape: tuple[int, ...], **options
) -> Backbone:
    """Build backbone ``name`` (case-insensitive) for inputs of ``input_shape``:
    ``(D,)`` for vectors, ``(C, H, W)`` for images. ``options`` go to the model
    constructor. Raises ValueError for an unknown name or a wrong input rank,
    TypeError for an unknown option."""
    key = name.lower()
    if key not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}"
        )
    return BACKBONES[key](num_classes, tuple(input_shape), **options)
