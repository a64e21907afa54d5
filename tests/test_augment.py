import pytest
import torch
import torch.nn.functional as F

from ssltrain import augment as A

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

IMAGE_FNS = {
    "random_flip": lambda x: A.random_flip(x),
    "random_translate": lambda x: A.random_translate(x, 2),
    "weak_augment": lambda x: A.weak_augment(x, pad=2),
    "cutout": lambda x: A.cutout(x, 0.5),
    "rand_augment": lambda x: A.rand_augment(x, pad=2),
    "gaussian_noise": lambda x: A.gaussian_noise(x, 0.1),
    "normalize": lambda x: A.normalize(x, [0.5] * x.shape[1], [0.25] * x.shape[1]),
}
RANDOM_FNS = [name for name in IMAGE_FNS if name != "normalize"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def assert_close(actual, expected, atol=1e-5):
    """Like torch.testing.assert_close (atol=0 means exact) without its slow first call."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=0, atol=atol), (actual - expected).abs().max()


def images(n=4, c=3, h=10, w=12, device="cpu", dtype=torch.float32):
    return torch.rand(n, c, h, w, device=device, dtype=dtype)


def run_seeded(fn, x, seed=0):
    torch.manual_seed(seed)
    return fn(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("n", [0, 3])
@pytest.mark.parametrize("name", IMAGE_FNS)
def test_shape_dtype_device_preserved(name, n, c, dtype, device):
    x = images(n, c, device=device, dtype=dtype)
    y = IMAGE_FNS[name](x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device


@pytest.mark.parametrize("name", IMAGE_FNS)
def test_channels_last_input_gives_same_result(name):
    x = images(5, 3, 9, 11)
    y = run_seeded(IMAGE_FNS[name], x)
    y_cl = run_seeded(IMAGE_FNS[name], x.contiguous(memory_format=torch.channels_last))
    assert_close(y_cl, y)


def test_vectors_shape_preserved():
    v = torch.rand(6, 5)
    assert A.gaussian_noise(v, 0.1).shape == v.shape
    assert A.gaussian_noise(v[:0], 0.1).shape == (0, 5)
    assert A.normalize(v, torch.zeros(5), torch.ones(5)).shape == v.shape


def test_flip():
    x = images()
    assert_close(A.random_flip(x, p=1.0), x.flip(-1), atol=0)
    assert_close(A.random_flip(A.random_flip(x, p=1.0), p=1.0), x, atol=0)
    assert_close(A.random_flip(x, p=0.0), x, atol=0)


def test_translate_pad0_is_identity():
    x = images()
    assert_close(A.random_translate(x, 0), x, atol=0)
    assert_close(A.weak_augment(x, pad=0, flip=False), x, atol=0)


def reference_translate(x, dx, dy, pad):
    h, w = x.shape[-2:]
    out = []
    for i in range(x.shape[0]):
        padded = F.pad(x[i:i + 1], (pad,) * 4, mode="reflect")[0]
        top, left = pad - int(dy[i]), pad - int(dx[i])
        out.append(padded[:, top:top + h, left:left + w])
    return torch.stack(out)


@pytest.mark.parametrize("channels_last", [False, True])
def test_translate_matches_per_sample_reference(channels_last):
    pad = 3
    x = images(8, 3, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dx, dy = torch.randint(-pad, pad + 1, (2, 8))
    assert_close(A._translate(x, dx, dy, pad), reference_translate(x, dx, dy, pad), atol=0)


def test_translate_direction():
    x = images(1)
    shifted = A._translate(x, torch.tensor([1]), torch.tensor([2]), 3)  # right by 1, down by 2
    assert_close(shifted[..., 2:, 1:], x[..., :-2, :-1], atol=0)


def test_random_translate_is_a_shift_within_pad():
    pad, n = 2, 16
    x = images(n, 1, 6, 6)
    y = A.random_translate(x, pad)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    crops = torch.stack([padded[..., pad - dy:pad - dy + 6, pad - dx:pad - dx + 6]
                         for dx in range(-pad, pad + 1) for dy in range(-pad, pad + 1)])  # [shifts, N, ...]
    matches = (crops == y).flatten(2).all(2)  # [shifts, N]
    assert matches.any(0).all()  # every sample is one of the allowed shifts
    assert torch.unique(matches.float().argmax(0)).numel() > 1  # ... and they are not all the same


@pytest.mark.parametrize("name", RANDOM_FNS)
def test_per_sample_randomness(name):
    x = images(1, 3, 8, 8).expand(16, -1, -1, -1).contiguous()
    y = run_seeded(IMAGE_FNS[name], x).flatten(1)
    distinct = torch.unique(y, dim=0).shape[0]
    assert distinct == 2 if name == "random_flip" else distinct >= 8


@pytest.mark.parametrize("name", RANDOM_FNS)
def test_deterministic_under_manual_seed(name):
    x = images(16, 3, 6, 6)
    fn = IMAGE_FNS[name]
    assert_close(run_seeded(fn, x, 1), run_seeded(fn, x, 1), atol=0)
    assert not torch.equal(run_seeded(fn, x, 1), run_seeded(fn, x, 2))


@pytest.mark.parametrize("c,channels_last", [(1, False), (3, True)])
def test_rand_augment_range(c, channels_last):
    x = torch.cat([images(10, c, 9, 13), torch.zeros(1, c, 9, 13), torch.ones(1, c, 9, 13)])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for magnitude in (None, 1.0):
        y = A.rand_augment(x, num_ops=3, magnitude=magnitude)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert y.min() >= 0 and y.max() <= 1


def test_rand_augment_without_ops_is_identity():
    x = images()
    y = A.rand_augment(x, num_ops=0, cutout_frac=0.0, pad=0, flip=False)
    assert_close(y, x, atol=0)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", [*A.COLOR_OPS, *A.GEOMETRIC_OPS])
def test_each_op_in_range_and_identity_at_zero(name, c):
    op, max_mag, signed = {**A.COLOR_OPS, **A.GEOMETRIC_OPS}[name]
    x = images(6, c)
    m = max_mag * (torch.rand(6) * 2 - 1 if signed else torch.rand(6))
    zero = torch.zeros(6)
    if name in A.GEOMETRIC_OPS:
        y, y0 = A._warp(x, op(x, m)), A._warp(x, op(x, zero))
    else:
        y, y0 = op(x, m), op(x, zero)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    if name not in ("autocontrast", "equalize"):  # these have no magnitude
        assert_close(y0, x, atol=0.5 / 255 + 1e-6)
    if name == "color" and c == 1:
        assert_close(y, x)


def test_warp_rotation_respects_aspect_ratio():
    x = images(2, 2, 4, 6)
    y = A._warp(x, A._rotate(x, torch.full((2,), 90.0)))
    centre = x[..., :, 1:5]  # the 4x4 block that stays inside a 4x6 frame
    assert any(torch.allclose(y[..., :, 1:5], centre.rot90(k, (-2, -1)), atol=1e-5) for k in (1, -1))
    assert (y[..., :, [0, 5]] == A.GRAY).all()


def test_warp_translation_is_exact_pixel_shift():
    x = images(1, 3, 5, 8)
    y = A._warp(x, A._translate_x(x, torch.tensor([2 / 8])))  # sampling matrix: output u reads input u + 2
    assert_close(y[..., :, :6], x[..., :, 2:])
    assert (y[..., :, 6:] == A.GRAY).all()


def test_cutout_at_fills_clipped_square():
    x = torch.zeros(2, 3, 10, 12)
    y = A._cutout_at(x, torch.tensor([5, 0]), torch.tensor([6, 0]), 4)
    assert set(y.unique().tolist()) == {0.0, A.GRAY}
    assert (y[0, :, 3:7, 4:8] == A.GRAY).all() and (y[0] == A.GRAY).sum() == 3 * 16
    assert (y[1, :, :2, :2] == A.GRAY).all() and (y[1] == A.GRAY).sum() == 3 * 4  # clipped at the corner


@pytest.mark.parametrize("h,w", [(16, 16), (12, 20)])
def test_cutout_area_fraction(h, w):
    n, frac = 4000, 0.5
    side = round(frac * min(h, w))

    def mean_cover(length):  # expected covered length along one axis, centre uniform over pixels
        return sum(min(c - side // 2 + side, length) - max(c - side // 2, 0) for c in range(length)) / length

    torch.manual_seed(0)
    area = (A.cutout(torch.zeros(n, 1, h, w), frac) == A.GRAY).flatten(1).sum(1).float()
    assert area.max() == side * side and area.min() > 0
    assert abs(area.mean() - mean_cover(h) * mean_cover(w)) < 1.0


def test_gaussian_noise_statistics():
    torch.manual_seed(0)
    noise = A.gaussian_noise(torch.full((20000, 4), 0.3), 0.2) - 0.3
    assert abs(noise.std().item() - 0.2) < 0.005
    assert abs(noise.mean().item()) < 0.005


def test_normalize():
    x = images(2, 3)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    expected = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert_close(A.normalize(x, mean, std), expected)
    assert_close(A.normalize(x, torch.tensor(mean), torch.tensor(std)), expected)
    v = torch.rand(4, 3)
    assert_close(A.normalize(v, mean, std), (v - torch.tensor(mean)) / torch.tensor(std))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_syncs_on_cuda():
    x = images(8, 3, 16, 16, device="cuda")
    mean, std = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        A.rand_augment(x)
        A.weak_augment(x)
        A.cutout(x, 0.5)
        A.gaussian_noise(x, 0.1)
        A.normalize(x, mean, std)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", list(A.COLOR_OPS))
def test_colour_op_on_hit_rows_only_equals_the_masked_whole_batch(name):
    op, max_mag, _ = A.COLOR_OPS[name]
    x, m, hit = torch.rand(16, 3, 8, 8), torch.rand(16) * max(max_mag, 1.0), torch.rand(16) < 0.4
    subset = A._apply_to_rows(op, x, m, hit, subset=True)  # the CPU path (hit rows only)
    torch.testing.assert_close(subset, A._apply_to_rows(op, x, m, hit, subset=False), rtol=0, atol=0)
    assert torch.equal(subset[~hit], x[~hit])
    none = torch.zeros(16, dtype=torch.bool)
    assert torch.equal(A._apply_to_rows(op, x, m, none, subset=True), x)
