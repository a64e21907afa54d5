"""tools/ds3l_meta_signal.py: the per-row meta signal equals grad L_labeled . grad Omega_j, row by row."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import TINY
from ssltrain import LossTerm

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import ds3l_meta_signal  # noqa: E402


def test_meta_signal_matches_per_row_gradients():
    torch.manual_seed(0)
    x_l, y_l, x_u = torch.randn(5, 3), torch.randn(5), torch.randn(4, 3)
    params = {"w": torch.randn(3, requires_grad=True)}

    def closure(params, labeled_only=False):
        labeled = ((x_l @ params["w"] - y_l) ** 2).mean()
        terms = [] if labeled_only else [LossTerm("toy/omega", (x_u @ params["w"]) ** 2, weight=0.5),
                                         LossTerm("toy/unweighted", (x_u @ params["w"]), weighted=False)]
        return SimpleNamespace(total=labeled, terms=terms)

    s, _ = ds3l_meta_signal.meta_signal(closure, params, 4)
    w = params["w"].detach()
    g_labeled = 2 * ((x_l @ w - y_l)[:, None] * x_l).mean(0)
    expected = (0.5 * 2 * (x_u @ w)[:, None] * x_u) @ g_labeled  # only the weighted term counts
    torch.testing.assert_close(s, expected)
    assert expected.abs().max() > 1e-3 and not torch.allclose(s, s[0].expand(4))  # rows differ


def test_rejects_a_run_without_seen_and_unseen_rows(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, "plugins": []}))
    monkeypatch.setattr(sys, "argv", ["ds3l_meta_signal.py", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"needs a run with data.class_mismatch .*\(plugins here: \[\]\)"):
        ds3l_meta_signal.main()
