"""The run's data: batch streams, views, and split wiring."""
from __future__ import annotations

import torch

from conftest import make_config
from ssltrain.data import Augmenter, BatchStream, build_data


def test_batch_stream_is_a_function_of_seed_and_step():
    idx = torch.arange(100, 110)
    a, b = BatchStream(idx, 4, seed=1), BatchStream(idx, 4, seed=1)
    first = torch.cat([a.at(s) for s in range(5)])
    assert torch.equal(torch.sort(first[:10]).values, idx)  # the first pass is a permutation
    assert torch.equal(b.at(3), a.at(3)) and torch.equal(b.at(0), first[:4])
    assert not torch.equal(BatchStream(idx, 4, seed=2).at(0), a.at(0))


def test_batch_larger_than_the_set_repeats_whole_passes():
    idx = torch.arange(3)
    batch = BatchStream(idx, 8, seed=0).at(0)
    assert len(batch) == 8
    assert torch.equal(torch.sort(batch[:3]).values, idx) and torch.equal(torch.sort(batch[3:6]).values, idx)


def test_image_views_and_class_mismatch(tmp_path, monkeypatch):
    from ssltrain import datasets

    def fake(**options):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (200, 1, 8, 8), generator=g, dtype=torch.uint8)
        y = torch.arange(200) % 4
        return datasets.DatasetArrays(x, y, x[:40], y[:40], 4, "image", list("abcd"), (0.5,), (0.25,))

    monkeypatch.setitem(datasets.DATASETS, "fake", lambda root, download, **o: fake(**o))
    config = make_config("data.name=fake", "data.options={}", "data.num_labeled=4",
                         "data.class_mismatch={seen_classes: [2, 0], unseen_ratio: 0.5}", "data.num_unlabeled=40")
    data = build_data(config, torch.device("cpu"))
    assert data.num_classes == 2 and data.classes == ["c", "a"] and len(data.test_y) == 20
    assert set(data.y_hidden[data.labeled_idx].tolist()) == {0, 1}
    assert (data.y_hidden[data.unlabeled_idx] == -1).sum() == 20
    aug = Augmenter(config.data, data, channels_last=False)
    raw = aug.raw(data.train_x[:5])
    assert raw.dtype == torch.float32 and raw.max() <= 1
    none = aug.view(raw, "none")
    torch.testing.assert_close(none, (raw - 0.5) / 0.25)
    assert aug.view(raw, "weak").shape == aug.view(raw, "strong").shape == (5, 1, 8, 8)


def test_batch_stream_chunks_do_not_change_the_stream():
    idx = torch.arange(7) * 3
    small, big = BatchStream(idx, 4, seed=5, chunk_rows=8), BatchStream(idx, 4, seed=5)
    assert all(torch.equal(small.at(s), big.at(s)) for s in [0, 1, 2, 9, 3, 17, 16])
