"""Normalizing flows for FlowGMM (methods.md section 4d): RealNVP for vectors and for images.

Every flow maps x -> (z, logdet) with z flattened to [N, D] and logdet = log|det dz/dx| per row [N],
and has an exact `inverse(z)`. Batch norm is used only inside the conditioner (s, t) networks, so it adds
nothing to the Jacobian; in train mode those networks see batch statistics, in eval mode running ones.
Output layers of the conditioners start at zero, so every coupling starts as the identity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


# ----------------------------------------------------------------------------- vectors
class VectorCoupling(nn.Module):
    """Affine coupling y = m*x + (1-m)*(x + t)*exp(s) with (s, t) = MLP(m*x), s = rescale*tanh(.) masked by (1-m)
(the official form, flowgmm coupling_layer.py CouplingLayerBase.forward: t added before the scale).

    The MLP is in -> hidden -> hidden -> 2*in (ReLU, dropout), as RealNVPTabular, with its learnable per-dimension
    `rescale` (init 1): without it |s| <= 1 caps each coupling's stretch at e. logdet = sum((1-m)*s).
    """

    def __init__(self, mask: Tensor, hidden: int, dropout: float):
        super().__init__()
        dim = mask.numel()
        self.register_buffer("mask", mask.float())
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.rescale = nn.Parameter(torch.ones(dim))

    def _st(self, x_id: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(x_id).chunk(2, dim=1)
        free = 1 - self.mask
        return self.rescale * torch.tanh(s) * free, t * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._st(x * self.mask)
        return (x + t) * torch.exp(s), s.sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self._st(y * self.mask)
        return y * torch.exp(-s) - t


class VectorRealNVP(nn.Module):
    """RealNVP for [N, D] vectors: `couplings` affine couplings with alternating parity masks."""

    def __init__(self, dim: int, couplings: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        parity = torch.arange(dim) % 2
        self.layers = nn.ModuleList(VectorCoupling(parity if i % 2 == 0 else 1 - parity, hidden, dropout)
                                    for i in range(couplings))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z


# ----------------------------------------------------------------------------- images
def dequantize_logit(x: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """The image flow's first layer: x in [0, 1] (multiples of 1/255) -> logits, with its logdet.

    u = (255 x + U[0, 1)) / 256 (fresh noise on every call), y = logit(alpha + (1 - 2 alpha) u),
    logdet = sum[softplus(y) + softplus(-y) + log(1 - 2 alpha)] over all but the batch dimension.
    The discrete likelihood then needs the constant -D log 256, added for reporting only.
    """
    u = (x * 255.0 + torch.rand_like(x)) / 256.0
    return logit_with_logdet(u, alpha)


def logit_with_logdet(u: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """y = logit(alpha + (1 - 2 alpha) u) and log|dy/du| summed per row."""
    p = alpha + (1 - 2 * alpha) * u
    y = torch.log(p) - torch.log1p(-p)
    ld = F.softplus(y) + F.softplus(-y) + math.log(1 - 2 * alpha)
    return y, ld.flatten(1).sum(1)


def inverse_logit(y: Tensor, alpha: float = 0.05) -> Tensor:
    """Inverse of `logit_with_logdet`: logits -> u in [0, 1] (clamped)."""
    return ((torch.sigmoid(y) - alpha) / (1 - 2 * alpha)).clamp(0, 1)


def squeeze(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, 4C, H/2, W/2] (each 2x2 patch to channels)."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """Inverse of `squeeze`."""
    n, c, h, w = x.shape
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, 2 * h, 2 * w)


def checkerboard(h: int, w: int, reverse: bool) -> Tensor:
    """[1, 1, H, W] mask with 1 where (i + j) is even (odd when `reverse`)."""
    grid = (torch.arange(h)[:, None] + torch.arange(w)[None]) % 2
    return (grid == int(reverse)).float().view(1, 1, h, w)


class ResidualBlock(nn.Module):
    """BN -> ReLU -> WN conv3x3 -> BN -> ReLU -> WN conv3x3, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(),
                                  weight_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=False)),
                                  nn.BatchNorm2d(channels), nn.ReLU(),
                                  weight_norm(nn.Conv2d(channels, channels, 3, padding=1, bias=True)))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConditionerResNet(nn.Module):
    """The s/t network of an image coupling (flowgmm resnet.py:49-82, code before commit 5c1bc3b):
    input BN (x2 for checkerboard), concat[x, -x], ReLU, WN conv3x3 to `mid` channels; a skip path that
    sums a WN 1x1 `in_skip` of that stem and a WN 1x1 conv after every residual block; BN, ReLU and a
    1x1 conv to `out` on the summed skips. The output conv starts at zero (the coupling starts as the
    identity: the `init_zeros` the official HEAD meant to add; the code before it used the default init)."""

    def __init__(self, in_ch: int, mid: int, out: int, blocks: int, double_after_norm: bool):
        super().__init__()
        self.in_norm = nn.BatchNorm2d(in_ch)
        self.double_after_norm = double_after_norm
        self.in_conv = weight_norm(nn.Conv2d(2 * in_ch, mid, 3, padding=1, bias=True))
        self.in_skip = weight_norm(nn.Conv2d(mid, mid, 1))
        self.blocks = nn.ModuleList(ResidualBlock(mid) for _ in range(blocks))
        self.skips = nn.ModuleList(weight_norm(nn.Conv2d(mid, mid, 1)) for _ in range(blocks))
        self.out_norm = nn.BatchNorm2d(mid)
        self.out_conv = nn.Conv2d(mid, out, 1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_norm(x) * (2.0 if self.double_after_norm else 1.0)
        x = self.in_conv(F.relu(torch.cat([x, -x], 1)))
        skip = self.in_skip(x)
        for block, skip_conv in zip(self.blocks, self.skips):
            x = block(x)
            skip = skip + skip_conv(x)
        return self.out_conv(F.relu(self.out_norm(skip)))


class ImageCoupling(nn.Module):
    """Affine coupling on [N, C, H, W]: checkerboard mask (all channels) or channel-wise (half the channels).

    y_change = (x_change + t) * exp(s) (flowgmm coupling_layer.py CouplingLayerBase.forward), s = rescale * tanh(raw_s)
    with a learnable per-channel rescale; logdet = sum of s over the changed entries only (the code before commit
    5c1bc3b also summed s over the conditioning entries of checkerboard couplings, a bug 5c1bc3b fixed).
    """

    def __init__(self, channels: int, mid: int, blocks: int, checker: bool, reverse: bool):
        super().__init__()
        self.checker, self.reverse = checker, reverse
        net_in = channels if checker else channels // 2
        self.net = ConditionerResNet(net_in, mid, 2 * net_in, blocks, double_after_norm=checker)
        self.rescale = nn.Parameter(torch.ones(1, net_in, 1, 1))

    def _st(self, x_id: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(x_id).chunk(2, dim=1)
        return self.rescale * torch.tanh(s), t

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x.chunk(2, dim=1)
        return (b, a) if self.reverse else (a, b)

    def _join(self, x_id: Tensor, x_change: Tensor) -> Tensor:
        return torch.cat([x_change, x_id] if self.reverse else [x_id, x_change], 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.checker:
            b = checkerboard(x.shape[2], x.shape[3], self.reverse).to(x)
            s, t = self._st(x * b)
            s, t = s * (1 - b), t * (1 - b)
            return (x + t) * torch.exp(s), s.flatten(1).sum(1)
        x_id, x_change = self._split(x)
        s, t = self._st(x_id)
        return self._join(x_id, (x_change + t) * torch.exp(s)), s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        if self.checker:
            b = checkerboard(y.shape[2], y.shape[3], self.reverse).to(y)
            s, t = self._st(y * b)
            s, t = s * (1 - b), t * (1 - b)
            return y * torch.exp(-s) - t
        y_id, y_change = self._split(y)
        s, t = self._st(y_id)
        return self._join(y_id, y_change * torch.exp(-s) - t)


class ImageRealNVP(nn.Module):
    """Multi-scale RealNVP on [N, C, H, W] (already preprocessed to logits).

    Each of the first `scales - 1` scales: 3 checkerboard couplings, squeeze, 3 channel-wise couplings,
    factor out half the channels; the last scale: 4 checkerboard couplings. z is the concatenation of the
    factored-out parts and the last scale's output, flattened: D = C*H*W. H and W must be divisible by
    2^(scales-1). Conditioner widths as the official RealNVP (flowgmm realnvp.py:43-65): `mid` channels for
    the first scale's checkerboard couplings, doubled for its channel-wise couplings and at every later scale
    (scales=2: 3 couplings at mid, 7 at 2*mid; the paper's 64/128), each with `blocks` residual blocks (8).
    """

    def __init__(self, input_shape: tuple[int, int, int], scales: int = 2, mid: int = 64, blocks: int = 8):
        super().__init__()
        c, h, w = input_shape
        if h % 2 ** (scales - 1) or w % 2 ** (scales - 1):
            raise ValueError(f"image flow with {scales} scales needs H and W divisible by {2 ** (scales - 1)}, "
                             f"got {h}x{w}")
        self.input_shape = tuple(input_shape)
        self.scales = nn.ModuleList()
        self.shapes = []  # per non-final scale: the shape of the factored-out part
        for _ in range(scales - 1):
            in_c = nn.ModuleList(ImageCoupling(c, mid, blocks, True, i % 2 == 1) for i in range(3))
            out_c = nn.ModuleList(ImageCoupling(4 * c, 2 * mid, blocks, False, i % 2 == 1) for i in range(3))
            self.scales.append(nn.ModuleList([in_c, out_c]))
            c, h, w = 4 * c, h // 2, w // 2
            self.shapes.append((c - c // 2, h, w))
            c, mid = c // 2, 2 * mid
        self.final = nn.ModuleList(ImageCoupling(c, mid, blocks, True, i % 2 == 1) for i in range(4))
        self.final_shape = (c, h, w)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet, parts = x.new_zeros(x.shape[0]), []
        for in_c, out_c in self.scales:
            for layer in in_c:
                x, ld = layer(x)
                logdet = logdet + ld
            x = squeeze(x)
            for layer in out_c:
                x, ld = layer(x)
                logdet = logdet + ld
            keep = x.shape[1] // 2
            parts.append(x[:, keep:].flatten(1))
            x = x[:, :keep]
        for layer in self.final:
            x, ld = layer(x)
            logdet = logdet + ld
        return torch.cat(parts + [x.flatten(1)], 1), logdet

    def inverse(self, z: Tensor) -> Tensor:
        sizes = [math.prod(s) for s in self.shapes] + [math.prod(self.final_shape)]
        chunks = list(z.split(sizes, dim=1))
        x = chunks.pop().view(-1, *self.final_shape)
        for layer in reversed(self.final):
            x = layer.inverse(x)
        for (in_c, out_c), shape in zip(reversed(self.scales), reversed(self.shapes)):
            x = torch.cat([x, chunks.pop().view(-1, *shape)], 1)
            for layer in reversed(out_c):
                x = layer.inverse(x)
            x = unsqueeze(x)
            for layer in reversed(in_c):
                x = layer.inverse(x)
        return x
