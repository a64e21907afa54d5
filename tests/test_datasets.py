"""Loaders, tested on tiny files written in each dataset's real on-disk format."""
import gzip
import os
import pickle
import sys

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.cifar
import torchvision.datasets.stl10
import torchvision.datasets.svhn
from PIL import Image

from ssltrain import ConfigError
from ssltrain.datasets import FASHION_MNIST_ROOT, DatasetNotFoundError, image_stats, load_dataset, read_idx

rng = np.random.default_rng(0)


@pytest.fixture
def skip_md5(monkeypatch):
    # torchvision checks the md5 sums of the real dataset files (in the datasets' _check_integrity and
    # CIFAR's _load_meta via the module-level check_integrity); our tiny fake files cannot match them.
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


def assert_images(d, n_train, n_test, shape, num_classes):
    assert d.kind == "image" and d.num_classes == num_classes == len(d.classes)
    assert d.train_x.shape == (n_train, *shape) and d.test_x.shape == (n_test, *shape)
    assert d.train_x.dtype == d.test_x.dtype == torch.uint8
    assert d.train_y.dtype == d.test_y.dtype == torch.int64
    assert len(d.mean) == len(d.std) == shape[0]


# ----------------------------------------------------------------------------- Fashion-MNIST
def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("subdir, suffix", [("", ".gz"), ("FashionMNIST/raw", "")])
def test_fashion_mnist_idx(tmp_path, subdir, suffix):
    folder = tmp_path / subdir
    folder.mkdir(parents=True, exist_ok=True)
    data = {name: rng.integers(0, 256, (n, 28, 28)) for name, n in (("train", 7), ("t10k", 3))}
    labels = {"train": np.arange(7) % 10, "t10k": np.array([9, 0, 4])}
    for split in ("train", "t10k"):
        write_idx(f"{folder}/{split}-images-idx3-ubyte{suffix}", data[split])
        write_idx(f"{folder}/{split}-labels-idx1-ubyte{suffix}", labels[split])
    d = load_dataset("fashion_mnist", root=str(tmp_path))
    assert_images(d, 7, 3, (1, 28, 28), 10)
    assert d.train_y.tolist() == labels["train"].tolist() and d.test_y.tolist() == [9, 0, 4]
    assert d.train_x[5, 0, 3, 17] == data["train"][5, 3, 17] and d.test_x[2, 0, 27, 0] == data["t10k"][2, 27, 0]
    assert d.mean[0] == pytest.approx(data["train"].mean() / 255)
    assert d.std[0] == pytest.approx(data["train"].std() / 255)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    with pytest.raises(ValueError, match="holds 2"):
        read_idx(tmp_path / "short")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason=f"{FASHION_MNIST_ROOT} missing "
                    "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_debian_files():
    d = load_dataset("fashion_mnist")
    assert_images(d, 60000, 10000, (1, 28, 28), 10)
    assert torch.bincount(d.train_y).tolist() == [6000] * 10
    assert d.mean[0] == pytest.approx(0.2860, abs=1e-3) and d.std[0] == pytest.approx(0.3530, abs=1e-3)


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion_mnist", root=str(tmp_path))
    for fix in ("apt-get install dataset-fashion-mnist", "data.root=", "data.download=true", str(tmp_path)):
        assert fix in str(e.value)


# ----------------------------------------------------------------------------- torchvision formats
def write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def test_cifar10(tmp_path, skip_md5):
    folder = tmp_path / "cifar-10-batches-py"
    batches = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(6)]
    for i, batch in enumerate(batches):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        write_pickle(folder / name, {"data": batch, "labels": [i, 9 - i]})
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    d = load_dataset("cifar10", root=str(tmp_path))
    assert_images(d, 10, 2, (3, 32, 32), 10)
    assert d.classes[3] == "c3" and d.train_y.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    assert d.test_y.tolist() == [5, 4]
    # CIFAR rows are 1024 red, then green, then blue values, each plane row-major
    assert d.train_x[3, 1, 5, 7] == batches[1][1, 1024 + 5 * 32 + 7]
    assert torch.equal(d.test_x[1], torch.from_numpy(batches[5][1].reshape(3, 32, 32)))


def test_cifar100(tmp_path, skip_md5):
    folder = tmp_path / "cifar-100-python"
    train, test = rng.integers(0, 256, (4, 3072), dtype=np.uint8), rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    write_pickle(folder / "train", {"data": train, "fine_labels": [0, 99, 50, 7], "coarse_labels": [0, 1, 2, 3]})
    write_pickle(folder / "test", {"data": test, "fine_labels": [3, 98], "coarse_labels": [0, 1]})
    write_pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    d = load_dataset("cifar100", root=str(tmp_path))
    assert_images(d, 4, 2, (3, 32, 32), 100)
    assert d.train_y.tolist() == [0, 99, 50, 7] and d.test_y.tolist() == [3, 98]
    assert d.train_x[2, 2, 31, 0] == train[2, 2048 + 31 * 32]


def test_svhn(tmp_path, skip_md5):
    x = {s: rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8) for s, n in (("train", 5), ("test", 2))}
    y = {"train": np.array([[10], [1], [2], [9], [10]]), "test": np.array([[3], [10]])}
    for s in x:
        scipy.io.savemat(tmp_path / f"{s}_32x32.mat", {"X": x[s], "y": y[s]})
    d = load_dataset("svhn", root=str(tmp_path))
    assert_images(d, 5, 2, (3, 32, 32), 10)
    assert d.train_y.tolist() == [0, 1, 2, 9, 0] and d.test_y.tolist() == [3, 0]
    assert d.train_x[4, 2, 10, 20] == x["train"][10, 20, 2, 4]  # X is [H, W, C, N]


def write_stl_images(path, images):
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())  # column-major per channel


def test_stl10(tmp_path, skip_md5):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    x = {s: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for s, n in (("train", 3), ("test", 2),
                                                                           ("unlabeled", 4))}
    for s in x:
        write_stl_images(folder / f"{s}_X.bin", x[s])
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 5]))  # 1-based on disk
    (folder / "test_y.bin").write_bytes(bytes([2, 3]))
    d = load_dataset("stl10", root=str(tmp_path))
    assert_images(d, 3, 2, (3, 96, 96), 10)
    assert d.train_y.tolist() == [0, 9, 4] and d.test_y.tolist() == [1, 2]
    assert d.train_x[1, 0, 10, 80] == x["train"][1, 0, 10, 80]
    assert d.extra_unlabeled_x.shape == (4, 3, 96, 96) and d.extra_unlabeled_x.dtype == torch.uint8
    assert torch.equal(d.extra_unlabeled_x, torch.from_numpy(x["unlabeled"]))
    assert load_dataset("stl10", root=str(tmp_path), use_unlabeled_split=False).extra_unlabeled_x is None


@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["cifar-10-batches-py/{data_batch_1,", "test_batch,batches.meta}", "cifar-10-python.tar.gz"]),
    ("cifar100", ["cifar-100-python/{train,test,meta}", "cifar-100-python.tar.gz"]),
    ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
    ("stl10", ["stl10_binary/{train_X.bin,", "unlabeled_X.bin", "stl10_binary.tar.gz"]),
])
def test_torchvision_dataset_missing(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, root=str(tmp_path))
    for fix in (*expected, "data.download=true", f"data.root={tmp_path}"):
        assert fix in str(e.value)


# ----------------------------------------------------------------------------- image folder
def test_image_folder(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 128, 255)}
    for split, n in (("train", 2), ("test", 1)):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 6), colour).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    d = load_dataset("image_folder", root=str(tmp_path), image_size=4)
    assert_images(d, 4, 2, (3, 4, 4), 2)
    assert d.classes == ["cat", "dog"] and d.train_y.tolist() == [0, 0, 1, 1] and d.test_y.tolist() == [0, 1]
    assert d.train_x[2, :, 1, 3].tolist() == [0, 128, 255]
    gray = load_dataset("image_folder", root=str(tmp_path), image_size=5, grayscale=True)
    assert gray.train_x.shape == (4, 1, 5, 5) and gray.train_x[0, 0, 0, 0] == 76  # L = .299 R + ...
    with pytest.raises(ConfigError, match="data.root"):
        load_dataset("image_folder", root=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- tabular
def test_tabular_npz(tmp_path):
    x_train = np.stack([np.arange(6.0), np.full(6, 3.0)], 1)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=np.array([5, 7, 5, 9, 7, 5]),
             x_test=np.array([[2.5, 3.0]]), y_test=np.array([9]))
    d = load_dataset("tabular", root=str(tmp_path / "d.npz"))
    assert d.kind == "vector" and d.mean is None and d.num_classes == 3 and d.classes == ["5", "7", "9"]
    assert d.train_x.dtype == torch.float32 and d.train_x.shape == (6, 2)
    assert d.train_y.tolist() == [0, 1, 0, 2, 1, 0] and d.test_y.tolist() == [2]
    assert torch.allclose(d.train_x.mean(0), torch.zeros(2), atol=1e-6)
    assert d.train_x[:, 0].std(correction=0) == pytest.approx(1) and d.train_x[:, 1].abs().max() == 0  # std 0 -> 1
    assert d.test_x[0].tolist() == pytest.approx([0, 0])


def test_tabular_csv(tmp_path):
    rows = [f"{i},{'cat' if i % 3 else 'dog'},{i * 2}" for i in range(10)]
    (tmp_path / "h.csv").write_text("a,kind,b\n" + "\n".join(rows) + "\n")
    d = load_dataset("tabular", root=str(tmp_path / "h.csv"), label_column="kind", test_fraction=0.3)
    assert d.classes == ["cat", "dog"] and len(d.train_y) == 7 and len(d.test_y) == 3
    assert d.train_x.shape == (7, 2) and torch.cat([d.train_y, d.test_y]).bincount().tolist() == [6, 4]
    again = load_dataset("tabular", root=str(tmp_path / "h.csv"), label_column=1, test_fraction=0.3)
    assert torch.equal(again.train_x, d.train_x) and torch.equal(again.test_y, d.test_y)
    other = load_dataset("tabular", root=str(tmp_path / "h.csv"), label_column=1, test_fraction=0.3, split_seed=1)
    assert not torch.equal(other.train_x, d.train_x)
    (tmp_path / "n.csv").write_text("0.5,1.5,10\n1.5,2.5,2\n2.5,0.5,10\n3.5,1.0,2\n")  # no header, label last
    n = load_dataset("tabular", root=str(tmp_path / "n.csv"), test_fraction=0.25)
    assert n.classes == ["2", "10"] and (len(n.train_y), len(n.test_y)) == (3, 1)


def test_tabular_missing_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        load_dataset("tabular", root=str(tmp_path / "none.npz"))


@pytest.mark.parametrize("dataset, rows, dim, classes", [("digits", 1797, 64, 10), ("wine", 178, 13, 3),
                                                         ("breast_cancer", 569, 30, 2), ("iris", 150, 4, 3)])
def test_sklearn_bundled(dataset, rows, dim, classes):
    d = load_dataset("sklearn", dataset=dataset, test_fraction=0.25, split_seed=3)
    assert d.kind == "vector" and d.num_classes == classes and len(d.classes) == classes
    assert len(d.train_y) + len(d.test_y) == rows and len(d.test_y) == round(rows * 0.25)
    assert d.train_x.shape[1] == dim and d.train_x.dtype == torch.float32
    assert torch.allclose(d.train_x.mean(0), torch.zeros(dim), atol=1e-5)
    assert set(torch.cat([d.train_y, d.test_y]).tolist()) == set(range(classes))
    again = load_dataset("sklearn", dataset=dataset, test_fraction=0.25, split_seed=3)
    assert torch.equal(again.test_x, d.test_x)


def test_sklearn_errors(monkeypatch):
    with pytest.raises(ValueError, match="data.options.dataset"):
        load_dataset("sklearn", dataset="mnist")
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    with pytest.raises(DatasetNotFoundError, match="pip install"):
        load_dataset("sklearn", dataset="digits")


# ----------------------------------------------------------------------------- two moons, registry, stats
def test_two_moons():
    a, b = load_dataset("two_moons", seed=3), load_dataset("two_moons", seed=3)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, load_dataset("two_moons", seed=4).train_x)
    assert a.kind == "vector" and a.num_classes == 2 and a.train_x.shape == (1000, 2) and a.test_x.shape == (1000, 2)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert abs(a.train_y.float().mean() - 0.5) < 0.05 and abs(a.test_y.float().mean() - 0.5) < 0.05
    assert torch.allclose(a.train_x.mean(0), torch.zeros(2), atol=1e-5)
    small = load_dataset("two_moons", n_train=50, n_test=20, noise=0.0)
    assert small.train_x.shape == (50, 2) and small.test_x.shape == (20, 2)


def test_unknown_name_and_option():
    with pytest.raises(ValueError, match="two_moons"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("two_moons", n_trian=10)


def test_image_stats_match_float64_reference():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = image_stats(x)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(ref.mean(1).tolist()) and std == pytest.approx(ref.std(1, correction=0).tolist())


def test_synthetic_images_have_the_requested_shape():
    a = load_dataset("synthetic", n_train=12, n_test=4, shape=(1, 5, 7), num_classes=3)
    assert a.train_x.shape == (12, 1, 5, 7) and a.train_x.dtype == torch.uint8 and a.kind == "image"
    assert a.test_y.max() < 3 and a.num_classes == 3
