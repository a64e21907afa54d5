"""Which unlabeled rows does DS3L's meta-gradient favour? A diagnostic for the class-mismatch benchmark.

    python tools/ds3l_meta_signal.py RUN_DIR [--at init|last] [--batches 8]

RUN_DIR is a finished (or interrupted) run of a config with an unlabeled loss, e.g. a benchmark cell of
configs/ds3l_fashion_mnist.yaml. For each of a few training batches, at the run's last checkpoint or at
initialisation, it computes every unlabeled row's first-order meta signal

    s_j = grad_theta Omega_j . grad_theta L_labeled

(methods.md 3g: dL_meta/dw_j ~ -inner_lr * s_j, so the meta step raises the weight of rows with s_j > 0),
exactly, by a double backward through the per-row weights (as the meta step itself does). It prints the AUROC of s
for telling seen-class rows from unseen-class rows (0.5: no preference; below 0.5: the signal itself
favours unseen rows), the mean s and mean |s| of each group, and, when DS3L is active, the AUROC of the meta-net's
weights on the same rows.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from ssltrain import checkpoint
from ssltrain.cli import load_config
from ssltrain.loop import Trainer
from ssltrain.losses import reduce_term
from ssltrain.plugins import discover, hooks_of
from ssltrain_plugins.ds3l import auroc, sample_weights


def meta_signal(closure, params: dict[str, torch.Tensor], n_rows: int):
    """s_j = grad_theta L_labeled . grad_theta Omega_j for each of `n_rows` unlabeled rows, exactly: the
    gradient in u of g_labeled . grad_theta sum_j u_j Omega_j at u = 1 (a double backward, as the meta
    step's). Omega_j is row j's share of the weighted terms of `closure(params=params)`, reduced by the
    core's `reduce_term` with u as the per-row weights. Returns (s [n_rows], the closure's LossResult)."""
    labeled = closure(params=params, labeled_only=True).total
    g_labeled = torch.autograd.grad(labeled, list(params.values()), allow_unused=True)
    u = torch.ones(n_rows, device=next(iter(params.values())).device, requires_grad=True)
    result = closure(params=params)
    weighted_sum = n_rows * sum(reduce_term(t, u, n_rows) for t in result.terms if t.weighted)  # sum_j u_j Omega_j
    g_omega = torch.autograd.grad(weighted_sum, list(params.values()), create_graph=True, allow_unused=True)
    dot = sum((a * b).sum() for a, b in zip(g_omega, g_labeled) if a is not None and b is not None)
    return torch.autograd.grad(dot, u)[0], result


def row_signal(trainer: Trainer, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(s [B_u], seen [B_u] bool, meta-net weights [B_u] or None) for the training batch of `step`."""
    batch = trainer.draw(step)
    ctx = trainer.context(step)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    s, result = meta_signal(trainer.make_closure(batch, ctx), params, len(batch.idx_u))
    plugin = trainer.pm.get_plugin("ds3l")
    weights = None
    if plugin is not None and plugin.meta_net is not None:
        with torch.no_grad():
            weights = sample_weights(plugin.meta_net, result.outputs.logits_u)
    return s, batch.y_u_hidden >= 0, weights


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--at", choices=["init", "last"], default="last")
    p.add_argument("--batches", type=int, default=8)
    args = p.parse_args()
    classes = discover()
    config = load_config(str(args.run_dir / "config.yaml"), [], classes)
    if config.data.class_mismatch is None or not any("ssl_unlabeled_loss" in hooks_of(classes[name])
                                                     for name in config.plugins):
        sys.exit(f"{args.run_dir}: needs a run with data.class_mismatch (seen/unseen rows) and a plugin with an "
                 f"unlabeled loss (plugins here: {config.plugins}); e.g. a pi_model or pi_model+ds3l benchmark cell")
    trainer = Trainer(config, tempfile.mkdtemp(), classes)
    if args.at == "last":
        trainer.load_state_dict(checkpoint.load(args.run_dir / "checkpoints" / "last.pt"))
    if trainer.pm.get_plugin("ds3l") is not None:
        trainer.pm.get_plugin("ds3l")._ensure_meta_net(trainer.context(trainer.step))
    trainer.model.train()
    rows = [row_signal(trainer, trainer.step + i) for i in range(args.batches)]
    s = torch.cat([r[0] for r in rows])
    seen = torch.cat([r[1] for r in rows])
    print(f"{args.run_dir} at {args.at} (step {trainer.step}), {len(s)} unlabeled rows, {int(seen.sum())} seen-class")
    print(f"meta signal s: AUROC seen vs unseen {float(auroc(s, seen)):.3f}; mean s seen {float(s[seen].mean()):.3g}, "
          f"unseen {float(s[~seen].mean()):.3g}; rows with s > 0: seen {float((s[seen] > 0).float().mean()):.2f}, "
          f"unseen {float((s[~seen] > 0).float().mean()):.2f}; mean |s| seen {float(s[seen].abs().mean()):.3g}, "
          f"unseen {float(s[~seen].abs().mean()):.3g}")
    if rows[0][2] is not None:
        w = torch.cat([r[2] for r in rows])
        print(f"meta-net weights: AUROC seen vs unseen {float(auroc(w, seen)):.3f}; "
              f"rank correlation with s {float(_spearman(w, s)):.3f}")
    return 0


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1]


if __name__ == "__main__":
    sys.exit(main())
