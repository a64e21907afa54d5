"""VAT under bf16 autocast: how close the adversarial direction of a bf16 run is to the float32 one.

Builds the real trainer from a VAT config (default configs/vat_fashion_mnist.yaml, on the CPU), optionally
trains it `--warmup` steps in float32, then runs the same step's closure twice from the same state and the
same random start d: once with `train.amp=bf16` and once in float32. The r_adv of each run is captured as
the plugin computes it. Prints, per unlabeled row averaged: the cosine of the bf16 r_adv to the float32
one, and the KL(p(x) || p(x + r)) each reaches (evaluated in float32), with that of a random direction.

    python tools/vat_precision.py [CONFIG] [--warmup 0] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import ssltrain_plugins.vat as vat
from ssltrain.cli import load_config
from ssltrain.loop import Trainer
from ssltrain.plugins import discover


def captured_r_adv(trainer: Trainer, step: int, amp_dtype) -> torch.Tensor:
    """r_adv of the VAT term in the closure of `step` with autocast set to `amp_dtype` (the RNG is reseeded:
    both precisions see the same augmented batch and start the power iteration from the same d)."""
    seen = []
    original = vat.adversarial_perturbation

    def record(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    trainer.amp_dtype = amp_dtype
    torch.manual_seed(1234)  # the same augmented batch and start d in both precisions
    ctx, batch = trainer.context(step), trainer.draw(step)
    trainer.hook.ssl_modify_batch(batch=batch, ctx=ctx)
    vat.adversarial_perturbation = record
    try:
        trainer.make_closure(batch, ctx)()
    finally:
        vat.adversarial_perturbation = original
    return seen[0].float(), batch


def reached_kl(trainer: Trainer, batch, r: torch.Tensor) -> float:
    """Mean float32 KL(p(x_u) || p(x_u + r)) with the labeled rows alongside (the plugin's batch composition)."""
    trainer.amp_dtype = None
    forward, n_l = trainer.forward_fn(), batch.x_l.shape[0]
    with torch.no_grad():
        clean = forward(torch.cat([batch.x_l, batch.x_u]), update_bn=False)["logits"][n_l:]
        moved = forward(torch.cat([batch.x_l, batch.x_u + r]), update_bn=False)["logits"][n_l:]
    return vat.kl_div(clean, moved).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="configs/vat_fashion_mnist.yaml")
    p.add_argument("--warmup", type=int, default=0, help="float32 training steps before the comparison")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    config = load_config(args.config, [*args.set, "train.amp=none", "train.cpu_threads=1"], discover())
    trainer = Trainer(config, tempfile.mkdtemp())
    if args.warmup:
        trainer.config.train.steps = args.warmup
        trainer.fit()
    step = trainer.step + 1_000_000  # past every ramp; a fresh batch
    r32, batch = captured_r_adv(trainer, step, None)
    r16, _ = captured_r_adv(trainer, step, torch.bfloat16)
    cos = torch.nn.functional.cosine_similarity(r16.flatten(1), r32.flatten(1), dim=1)
    torch.manual_seed(0)
    rand = vat.normalize_rows(torch.randn_like(r32)) * r32.flatten(1).norm(dim=1).view(-1, *[1] * (r32.dim() - 1))
    kl32, kl16, kl_rand = (reached_kl(trainer, batch, r) for r in (r32, r16, rand))
    print(f"rows {r32.shape[0]}, warmup {args.warmup} steps: cosine(r_adv bf16, r_adv fp32) mean {cos.mean():.4f} "
          f"(min {cos.min():.4f}); KL reached: fp32 {kl32:.5f}, bf16 {kl16:.5f} ({kl16 / kl32:.1%} of fp32), "
          f"random direction {kl_rand:.5f}")


if __name__ == "__main__":
    main()
