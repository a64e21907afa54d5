"""Batched, on-device data augmentation with per-sample randomness.

Pure functions returning a new tensor with the input's shape, dtype and device (the memory
format may come back contiguous).  Images are float ``[N, C, H, W]`` in [0, 1] (before
normalisation) with C = 1 or 3; vectors are ``[N, D]``; any N >= 0 works.  All randomness comes
from torch's global RNG on ``x.device``, and what is drawn depends only on shapes and arguments,
never on data, so restoring torch's RNG states reproduces the augmentation.  No per-sample Python
loops, no host syncs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

GRAY = 0.5  # fill value of cutout and of the area uncovered by rand_augment's affine warp


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """View a per-sample ``[N]`` tensor so that it broadcasts against ``x``."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def random_flip(x: Tensor, p: float = 0.5) -> Tensor:
    """Flip each image horizontally, independently with probability ``p``."""
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(_per_sample(flip, x), x.flip(-1), x)


def _translate(x: Tensor, dx: Tensor, dy: Tensor, pad: int) -> Tensor:
    """Shift image ``i`` right by ``dx[i]`` and down by ``dy[i]`` pixels (``[N]`` int tensors in
    ``[-pad, pad]``), filling with reflection.  Per sample this equals
    ``F.pad(x[i], (pad,) * 4, mode="reflect")[:, pad - dy:pad - dy + H, pad - dx:pad - dx + W]``.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = torch.arange(h, device=x.device) + (pad - dy)[:, None]  # [N, H]
    cols = torch.arange(w, device=x.device) + (pad - dx)[:, None]  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def random_translate(x: Tensor, pad: int) -> Tensor:
    """Translate each image by independent integer offsets in ``[-pad, pad]`` along both axes,
    reflect-padding the uncovered border (pad-and-random-crop).  Requires ``pad < min(H, W)``;
    ``pad=0`` is the identity."""
    dx, dy = torch.randint(-pad, pad + 1, (2, x.shape[0]), device=x.device)
    return _translate(x, dx, dy, pad)


def weak_augment(x: Tensor, pad: int = 4, flip: bool = True) -> Tensor:
    """The MixMatch/FixMatch "weak" policy: ``random_translate(x, pad)``, then ``random_flip`` if ``flip``."""
    x = random_translate(x, pad)
    return random_flip(x) if flip else x


def _cutout_at(x: Tensor, cy: Tensor, cx: Tensor, side: int) -> Tensor:
    """Fill with gray the ``side x side`` square of image ``i`` whose top-left corner is
    ``(cy[i] - side // 2, cx[i] - side // 2)``, clipped to the image."""
    h, w = x.shape[-2:]
    top, left = (cy - side // 2)[:, None], (cx - side // 2)[:, None]
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (ys >= top) & (ys < top + side)  # [N, H]
    in_cols = (xs >= left) & (xs < left + side)  # [N, W]
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], GRAY)


def cutout(x: Tensor, size_frac: float) -> Tensor:
    """Fill with gray (0.5) a square of side ``round(size_frac * min(H, W))`` per image, centred on
    an independent uniformly random pixel; the square is clipped where it crosses the border."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), device=x.device)
    cx = torch.randint(0, w, (n,), device=x.device)
    return _cutout_at(x, cy, cx, round(size_frac * min(h, w)))


# --- RandAugment ops: each takes (x, m) with m a per-sample [N] magnitude in the op's own units.

def _gray(x: Tensor) -> Tensor:
    """Luma (ITU-R 601-2, as PIL) as ``[N, 1, H, W]``; a grayscale batch is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: Tensor, degenerate: Tensor | float, factor: Tensor) -> Tensor:
    """PIL ``ImageEnhance``: ``degenerate + factor * (x - degenerate)`` with a per-sample factor."""
    return (degenerate + _per_sample(factor, x) * (x - degenerate)).clamp(0, 1)


def _identity(x: Tensor, m: Tensor) -> Tensor:
    return x


def _autocontrast(x: Tensor, m: Tensor) -> Tensor:
    """Stretch each channel of each image to [0, 1]; constant channels are left unchanged."""
    lo, hi = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    spread = hi > lo
    return torch.where(spread, (x - lo) / torch.where(spread, hi - lo, 1.0), x)


def _equalize(x: Tensor, m: Tensor) -> Tensor:
    """Per-channel histogram equalisation of the 8-bit levels, with PIL's lookup table; channels
    with a single level are left unchanged."""
    levels = (x * 255).round().long().flatten(2)  # [N, C, H*W]
    hist = torch.zeros(*levels.shape[:2], 256, device=x.device).scatter_add_(
        2, levels, torch.ones(levels.shape, device=x.device))
    top = hist.gather(2, levels.amax(2, keepdim=True))  # count of the brightest level present
    step = torch.floor((levels.shape[-1] - top) / 255)
    lut = torch.floor((hist.cumsum(2) - hist + torch.floor(step / 2)) / step.clamp(min=1)).clamp(max=255)
    out = (lut.gather(2, levels) / 255).view_as(x).to(x.dtype)
    return torch.where(step[..., None] > 0, out, x)


def _brightness(x: Tensor, m: Tensor) -> Tensor:
    return _blend(x, 0.0, 1 + m)


def _color(x: Tensor, m: Tensor) -> Tensor:
    """Saturation; the identity for grayscale images."""
    return _blend(x, _gray(x), 1 + m)


def _contrast(x: Tensor, m: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), 1 + m)


def _sharpness(x: Tensor, m: Tensor) -> Tensor:
    """Blend with PIL's 3x3 smoothing filter ([[1,1,1],[1,5,1],[1,1,1]] / 13, edges replicated)."""
    box = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return _blend(x, (9 * box + 4 * x) / 13, 1 + m)


def _posterize(x: Tensor, m: Tensor) -> Tensor:
    """Keep ``8 - round(m)`` bits of the 8-bit value."""
    step = _per_sample(torch.exp2(m.round()), x)
    return torch.floor((x * 255).round() / step) * step / 255


def _solarize(x: Tensor, m: Tensor) -> Tensor:
    """Invert pixels above the threshold ``1 - m``."""
    return torch.where(x > 1 - _per_sample(m, x), 1 - x, x)


def _affine(m: Tensor, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> Tensor:
    """Per-sample ``[N, 3, 3]`` matrices ``[[a, b, c], [d, e, f], [0, 0, 1]]``; entries are
    floats or ``[N]`` tensors like ``m``."""
    entries = [v if torch.is_tensor(v) else torch.full_like(m, v) for v in (a, b, c, d, e, f, 0.0, 0.0, 1.0)]
    return torch.stack(entries, -1).view(-1, 3, 3)


# Geometric ops return sampling matrices (output pixel -> input pixel, in pixels, origin at the
# image centre); their ranges are symmetric, so sampling the inverse transform is equivalent.

def _rotate(x: Tensor, m: Tensor) -> Tensor:
    t = torch.deg2rad(m)
    return _affine(m, t.cos(), -t.sin(), 0.0, t.sin(), t.cos())


def _shear_x(x: Tensor, m: Tensor) -> Tensor:
    return _affine(m, b=m)


def _shear_y(x: Tensor, m: Tensor) -> Tensor:
    return _affine(m, d=m)


def _translate_x(x: Tensor, m: Tensor) -> Tensor:
    return _affine(m, c=m * x.shape[-1])


def _translate_y(x: Tensor, m: Tensor) -> Tensor:
    return _affine(m, f=m * x.shape[-2])


def _warp(x: Tensor, matrices: Tensor) -> Tensor:
    """Resample image ``i`` at ``matrices[i] @ (u, v, 1)`` for each output pixel ``(u, v)``
    (pixel units, origin at the image centre), bilinearly, with gray outside the image."""
    n, _, h, w = x.shape
    template = x.new_zeros(n)
    theta = _affine(template, a=2 / w, e=2 / h) @ matrices @ _affine(template, a=w / 2, e=h / 2)
    grid = F.affine_grid(theta[:, :2], list(x.shape), align_corners=False)
    return F.grid_sample(x - GRAY, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + GRAY


# name: (op, max magnitude, signed).  A magnitude fraction f in [0, 1] gives m = f * max, times an
# independent random sign per sample for signed ops; f = 0 is (close to) the identity for every op.
COLOR_OPS = {
    "identity": (_identity, 0.0, False),
    "autocontrast": (_autocontrast, 0.0, False),
    "equalize": (_equalize, 0.0, False),
    "brightness": (_brightness, 0.9, True),
    "color": (_color, 0.9, True),
    "contrast": (_contrast, 0.9, True),
    "sharpness": (_sharpness, 0.9, True),
    "posterize": (_posterize, 4.0, False),
    "solarize": (_solarize, 1.0, False),
}
GEOMETRIC_OPS = {
    "rotate": (_rotate, 30.0, True),
    "shear_x": (_shear_x, 0.3, True),
    "shear_y": (_shear_y, 0.3, True),
    "translate_x": (_translate_x, 0.3, True),  # fraction of the width
    "translate_y": (_translate_y, 0.3, True),  # fraction of the height
}


def _apply_to_rows(op, x: Tensor, m: Tensor, hit: Tensor, subset: bool) -> Tensor:
    """x with row i replaced by op(x, m)[i] where hit[i] (every op is per-sample).

    subset=False computes op on the whole batch and selects with a mask: no data-dependent shapes,
    hence no host sync (the GPU path). subset=True runs op on the hit rows only: ~len(ops) times less
    work per op slot, at the price of a sync that costs nothing on the CPU. Same result either way."""
    if not subset:
        return torch.where(_per_sample(hit, x), op(x, m), x)
    rows = hit.nonzero().squeeze(1)
    if rows.numel() == 0:
        return x
    return x.index_copy(0, rows, op(x[rows], m[rows]))


def rand_augment(x: Tensor, num_ops: int = 2, magnitude: float | None = None,
                 cutout_frac: float = 0.5, pad: int = 4, flip: bool = True) -> Tensor:
    """RandAugment-style strong policy (FixMatch's strong view).

    Each sample independently draws ``num_ops`` ops uniformly (with replacement) from
    ``COLOR_OPS`` and ``GEOMETRIC_OPS``, each with its own magnitude fraction: uniform in [0, 1]
    if ``magnitude is None``, else ``magnitude``.  Colour ops are applied in draw order via
    per-sample masks; the geometric ops are composed into one affine matrix per sample and
    applied afterwards with a single bilinear ``grid_sample``, filling uncovered pixels with gray
    (0.5).  The result is clamped to [0, 1], then ``weak_augment(x, pad, flip)`` and
    ``cutout(x, cutout_frac)`` are applied.  Grayscale (C=1) images are supported.
    """
    n = x.shape[0]
    if n == 0:  # affine_grid rejects empty batches
        return x.clone()
    ops = [*COLOR_OPS.values(), *GEOMETRIC_OPS.values()]
    choice = torch.randint(len(ops), (num_ops, n), device=x.device)
    frac = (torch.rand(num_ops, n, device=x.device, dtype=x.dtype) if magnitude is None
            else torch.full((num_ops, n), float(magnitude), device=x.device, dtype=x.dtype))
    sign = torch.randint(2, (num_ops, n), device=x.device, dtype=x.dtype) * 2 - 1

    template = x.new_zeros(n)
    warp = _affine(template)
    for j in range(num_ops):
        step = _affine(template)
        for k, (op, max_mag, signed) in enumerate(ops):
            m = frac[j] * max_mag * (sign[j] if signed else 1.0)
            hit = choice[j] == k
            if k < len(COLOR_OPS):
                x = _apply_to_rows(op, x, m, hit, subset=x.device.type == "cpu")
            else:
                step = torch.where(hit[:, None, None], op(x, m), step)
        warp = warp @ step

    has_geometric = (choice >= len(COLOR_OPS)).any(0)
    x = torch.where(_per_sample(has_geometric, x), _warp(x, warp), x).clamp(0, 1)
    return cutout(weak_augment(x, pad, flip), cutout_frac)


def gaussian_noise(x: Tensor, std: float | Tensor) -> Tensor:
    """Return ``x + std * N(0, 1)`` noise (any shape; ``std`` a float or broadcastable tensor).
    The noise is drawn in logical order, so it does not depend on ``x``'s memory format."""
    return x + std * torch.randn(x.shape, device=x.device, dtype=x.dtype)


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Return ``(x - mean) / std`` along dim 1 (channels of ``[N, C, H, W]``, features of ``[N, D]``).

    ``mean``/``std`` have length C (or are scalars).  Pass tensors already on ``x.device`` to
    avoid a host-to-device copy per call."""
    shape = (-1,) + (1,) * (x.dim() - 2)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean) / std
