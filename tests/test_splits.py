import pytest
import torch

from ssltrain.splits import make_split, remap_labels, seen_class_mask

Y = torch.arange(10).repeat_interleave(50)  # 10 classes x 50 rows, 500 rows


def test_labeled_class_balanced_and_sorted():
    s = make_split(Y, 10, 40, seed=0)
    assert s.labeled_idx.dtype == s.unlabeled_idx.dtype == torch.int64
    assert torch.bincount(Y[s.labeled_idx], minlength=10).tolist() == [4] * 10
    assert torch.equal(s.labeled_idx, s.labeled_idx.sort().values) and len(s.labeled_idx.unique()) == 40
    assert torch.equal(s.label_map, torch.arange(10)) and s.num_classes == 10
    assert torch.bincount(Y[make_split(Y, 10, 23, seed=0).labeled_idx]).tolist() == [3, 3, 3] + [2] * 7


def test_num_labeled_none_labels_every_row_of_the_seen_classes():
    y = torch.tensor([0, 0, 0, 1, 2, 2, 1])  # imbalanced classes
    s = make_split(y, 3, None, seed=0)
    assert s.labeled_idx.tolist() == list(range(7)) and s.unlabeled_idx.tolist() == list(range(7))
    assert len(make_split(y, 3, None, seed=0, include_labeled_in_unlabeled=False).unlabeled_idx) == 0


def test_deterministic_per_seed():
    a, b, c = make_split(Y, 10, 40, seed=1), make_split(Y, 10, 40, seed=1), make_split(Y, 10, 40, seed=2)
    assert torch.equal(a.labeled_idx, b.labeled_idx) and torch.equal(a.unlabeled_idx, b.unlabeled_idx)
    assert not torch.equal(a.labeled_idx, c.labeled_idx)


def test_include_labeled_in_unlabeled():
    s = make_split(Y, 10, 40, seed=0)
    assert torch.equal(s.unlabeled_idx, torch.arange(500))
    s = make_split(Y, 10, 40, seed=0, include_labeled_in_unlabeled=False)
    assert len(s.unlabeled_idx) == 460 and not torch.isin(s.labeled_idx, s.unlabeled_idx).any()
    s = make_split(Y, 10, 40, seed=0, include_labeled_in_unlabeled=False, num_unlabeled=100)
    assert len(s.unlabeled_idx.unique()) == 100 and not torch.isin(s.labeled_idx, s.unlabeled_idx).any()


def test_mismatch_ratio_zero_has_no_unseen_rows():
    s = make_split(Y, 10, 12, seed=0, seen_classes=[0, 1, 2, 3, 4, 5], unseen_ratio=0.0)
    assert s.num_classes == 6 and torch.bincount(Y[s.labeled_idx], minlength=10)[6:].sum() == 0
    assert seen_class_mask(Y[s.unlabeled_idx], s.label_map).all()
    assert len(s.unlabeled_idx) == 6 * 48 and not torch.isin(s.labeled_idx, s.unlabeled_idx).any()


@pytest.mark.parametrize("ratio, num_unlabeled", [(0.3, 200), (0.5, 101), (0.75, None), (1.0, 40)])
def test_mismatch_unseen_fraction(ratio, num_unlabeled):
    s = make_split(Y, 10, 12, seed=3, seen_classes=[2, 5, 7, 8, 9, 0], unseen_ratio=ratio, num_unlabeled=num_unlabeled)
    n = len(s.unlabeled_idx)
    assert num_unlabeled in (None, n) and len(s.unlabeled_idx.unique()) == n
    n_unseen = int((~seen_class_mask(Y[s.unlabeled_idx], s.label_map)).sum())
    assert abs(n_unseen - ratio * n) <= 0.5
    counts = torch.bincount(Y[s.unlabeled_idx], minlength=10)
    unseen_counts, seen_counts = counts[[1, 3, 4, 6]], counts[[2, 5, 7, 8, 9, 0]]
    assert unseen_counts.max() - unseen_counts.min() <= 1
    assert n == n_unseen or seen_counts.max() - seen_counts.min() <= 1
    assert torch.isin(Y[s.labeled_idx], torch.tensor([2, 5, 7, 8, 9, 0])).all()
    assert not torch.isin(s.labeled_idx, s.unlabeled_idx).any()


def test_mismatch_default_size_is_maximal():
    # 4 unseen classes x 50 rows cap the unseen part at 200 = round(0.75 * 267); 268 would need 201
    s = make_split(Y, 10, 12, seed=0, seen_classes=[0, 1, 2, 3, 4, 5], unseen_ratio=0.75)
    assert len(s.unlabeled_idx) == 267
    with pytest.raises(ValueError, match="not enough samples"):
        make_split(Y, 10, 12, seed=0, seen_classes=[0, 1, 2, 3, 4, 5], unseen_ratio=0.75, num_unlabeled=268)


def test_label_map_and_remap():
    s = make_split(Y, 10, 6, seed=0, seen_classes=[7, 2, 4])
    assert s.label_map.tolist() == [-1, -1, 1, -1, 2, -1, -1, 0, -1, -1] and s.num_classes == 3
    y = torch.tensor([7, 3, 4, 2])
    assert remap_labels(y, s.label_map).tolist() == [0, -1, 2, 1]
    assert seen_class_mask(y, s.label_map).tolist() == [True, False, True, True]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_labeled=5), "smaller than the number"),
    (dict(num_labeled=510), "class 0 has 50 train samples"),
    (dict(num_labeled=20, num_unlabeled=501), "num_unlabeled"),
    (dict(num_labeled=20, seen_classes=[0, 0]), "distinct"),
    (dict(num_labeled=20, seen_classes=[0, 10]), "distinct"),
    (dict(num_labeled=20, seen_classes=list(range(10)), unseen_ratio=0.5), "not enough samples"),
    (dict(num_labeled=20, seen_classes=[0, 1], unseen_ratio=1.5), "unseen_ratio"),
    (dict(num_labeled=20, unseen_ratio=0.5), "needs seen_classes"),
])
def test_impossible_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_split(Y, 10, seed=0, **kwargs)


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        make_split(Y, 5, 10, seed=0)
