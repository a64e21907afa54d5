"""Labeled/unlabeled splits of a training set, including class-mismatch (unseen-class) setups.

``make_split`` indexes train rows only. Extra label-free rows (``DatasetArrays.extra_unlabeled_x``, e.g.
STL-10's unlabeled split) are added by the caller by convention: ``unlabeled_idx`` gets
``len(train_y) + arange(len(extra))`` appended and indexes ``torch.cat([train_x, extra])``, so index
``len(train_y) + i`` means ``extra_unlabeled_x[i]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    """Which train rows are labeled / unlabeled, and the label remapping of a class-mismatch setup."""

    labeled_idx: torch.Tensor  # int64, sorted, rows of train_x
    unlabeled_idx: torch.Tensor  # int64, sorted, rows of train_x (see the module doc for extra rows)
    label_map: torch.Tensor  # int64 [num_original_classes]: original -> new label, -1 for unseen classes
    num_classes: int  # classes after the remap


def _even_counts(total: int, k: int) -> list[int]:
    """``total`` split over ``k`` buckets: ``total // k`` each, the remainder one each to the first buckets."""
    return [total // k + (i < total % k) for i in range(k)]


def make_split(train_y, num_classes: int, num_labeled: int | None, seed: int, include_labeled_in_unlabeled: bool = True,
               seen_classes=None, unseen_ratio: float = 0.0, num_unlabeled: int | None = None) -> Split:
    """Draw a deterministic (per ``seed``) labeled/unlabeled split of ``train_y``.

    Labeled: ``num_labeled`` rows, class-balanced over the seen classes (``num_labeled // S`` each, the
    remainder to the first classes in order); None: every row of the seen classes. Without mismatch (``seen_classes`` None): the unlabeled pool
    is every train row (or every non-labeled row if not ``include_labeled_in_unlabeled``);
    ``num_unlabeled`` draws a random subset of that pool.
    With mismatch (``seen_classes`` = original class ids, in new-label order): the unlabeled set never
    holds labeled rows and has ``num_unlabeled`` rows (default: as many as possible), of which
    ``num_unlabeled * unseen_ratio`` (rounded half up) come evenly from the unseen classes and the rest
    evenly from the seen classes; labels map seen -> 0..S-1, unseen -> -1. True labels stay in ``train_y``.
    Raises ValueError for impossible requests.
    """
    y = torch.as_tensor(train_y, dtype=torch.int64)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    mismatch = seen_classes is not None
    seen = [int(c) for c in seen_classes] if mismatch else list(range(num_classes))
    if not seen or len(set(seen)) != len(seen) or not all(0 <= c < num_classes for c in seen):
        raise ValueError(f"seen_classes must be distinct class ids in [0, {num_classes}), got {seen_classes}")
    unseen = [c for c in range(num_classes) if c not in seen]
    if not 0 <= unseen_ratio <= 1 or (unseen_ratio and not mismatch):
        raise ValueError(f"unseen_ratio must be in [0, 1] and needs seen_classes, got {unseen_ratio}")
    if num_labeled is not None and num_labeled < len(seen):
        raise ValueError(f"num_labeled={num_labeled} is smaller than the number of (seen) classes, {len(seen)}")

    g = torch.Generator().manual_seed(seed)
    # every class's rows in a seed-determined random order; labeled rows are a prefix of their class's order
    order = {c: (y == c).nonzero().squeeze(1) for c in range(num_classes)}
    order = {c: rows[torch.randperm(len(rows), generator=g)] for c, rows in order.items()}
    per_class = {c: len(order[c]) for c in seen} if num_labeled is None else \
        dict(zip(seen, _even_counts(num_labeled, len(seen))))
    for c, n in per_class.items():
        if len(order[c]) < n:
            raise ValueError(f"class {c} has {len(order[c])} train samples but {n} labeled samples "
                             f"were requested from it (num_labeled={num_labeled} over {len(seen)} classes); lower "
                             f"data.num_labeled, or set it to null to label every train row")
    labeled = torch.cat([order[c][:n] for c, n in per_class.items()]).sort().values
    label_map = torch.full((num_classes,), -1, dtype=torch.int64)
    label_map[seen] = torch.arange(len(seen))

    if not mismatch:
        pool = torch.arange(len(y))
        if not include_labeled_in_unlabeled:
            pool = pool[~torch.isin(pool, labeled)]
        if num_unlabeled is not None:
            if not 0 < num_unlabeled <= len(pool):
                raise ValueError(f"num_unlabeled={num_unlabeled} is not in [1, {len(pool)}] (the unlabeled pool)")
            pool = pool[torch.randperm(len(pool), generator=g)[:num_unlabeled]]
        return Split(labeled, pool.sort().values, label_map, num_classes)

    available = {c: order[c][per_class.get(c, 0):] for c in range(num_classes)}  # never labeled rows

    def plan(total: int) -> list[tuple[int, int]] | None:
        """(class, count) pairs for an unlabeled set of ``total`` rows, or None if there are too few samples."""
        n_unseen = int(total * unseen_ratio + 0.5)
        pairs = []
        for classes, n in ((unseen, n_unseen), (seen, total - n_unseen)):
            if classes:
                pairs += zip(classes, _even_counts(n, len(classes)))
            elif n:
                return None
        return pairs if all(n <= len(available[c]) for c, n in pairs) else None

    if num_unlabeled is None:  # largest feasible size: feasibility is monotone in the size, so bisect
        lo, hi = 0, sum(len(rows) for rows in available.values())
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if plan(mid) is not None else (lo, mid - 1)
        num_unlabeled = lo
    pairs = plan(num_unlabeled)
    if pairs is None or num_unlabeled <= 0:
        raise ValueError(
            f"not enough samples for {num_unlabeled} unlabeled rows with unseen_ratio={unseen_ratio}: "
            f"non-labeled rows available per seen class {[len(available[c]) for c in seen]}, "
            f"per unseen class {[len(available[c]) for c in unseen]}")
    unlabeled = torch.cat([available[c][:n] for c, n in pairs]).sort().values
    return Split(labeled, unlabeled, label_map, len(seen))


def remap_labels(y: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
    """Original labels -> remapped labels (-1 for unseen classes)."""
    return label_map[y]


def seen_class_mask(y: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
    """Bool mask of the rows whose (original) class is seen."""
    return label_map[y] >= 0

