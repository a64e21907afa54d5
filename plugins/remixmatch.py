"""ReMixMatch (Berthelot et al. 2020), faithful to google-research/remixmatch (cited as file:line at its
HEAD): `remixmatch_no_cta.py` (the losses) run as `cta/cta_remixmatch.py` (the paper's setting: CTAugment
strong views, `redux=1st`). MixMatch's pieces are reused from `ssltrain_plugins.mixmatch`.

Per step, for B_u unlabeled rows:
- Augmentation anchoring: one weak view (the anchor) and K strong views of every row
  (libml/augment.py:208: view 0 keeps the weak augmentation, views 1..K get CTAugment). CTAugment
  (a policy learned from the labeled rows, cta/lib/train.py:63-76) is not available here: the strong views
  are this project's RandAugment + cutout (`ctx.augment(raw, "strong")`), as USB does.
- Label guess from the anchor only (`redux=1st`, cta_remixmatch.py:72; remixmatch_no_cta.py:43-45):
  p = softmax of the model on the weak view (train-mode forward without gradient, batch-norm running
  statistics untouched: the official code drops every update op but the last interleaved forward's,
  remixmatch_no_cta.py:131-133).
- Distribution alignment (use_dm, remixmatch_no_cta.py:51-55): p~ = Normalize(p * p_data / p_model), then
  sharpening q = Sharpen(p~, T) (lines 57-59), detached (line 112). `mixmatch.DistributionAlignment`:
  p_model is an EMA of the batch-mean predictions (official: the mean of the last 128 batch means,
  layers.py:125-140 with dbuf=128, line 87; USB: an EMA with momentum 0.999, dist_align.py:51), p_data the
  labeled class marginal seen so far (official: an EMA with decay 0.999 of the labeled batches' one-hot
  means when the dataset declares none, layers.py:143-164; USB: the labeled set's marginal).
- Every one of the K + 1 views gets the target q (line 123: `tf.split(ly, K + 1)` of the tiled guess), and
  MixUp runs over one pool of the labeled rows and all (K + 1) B_u unlabeled views (MixMode 'xxy.yxy',
  line 71 and layers.py:232-236, beta 0.75): `mixmatch.mix_into_batch`.
- The labeled rows get the strong augmentation too (libml/augment.py:204-206: the labeled image is
  CTAugment-ed; `strong_labeled`).
- Interleaved batch norm (lines 129-136) as MixMatch: `mixmatch.interleaved_forward` (the official code
  keeps the last chunk's running-statistics update, MixMatch's the first; here the first, as MixMatch).

Losses (line 160-163: loss_xe + w_kl * loss_kl + w_match * loss_xeu + w_rot * loss_rot, each a mean):
- supervised: cross-entropy of the mixed labeled rows against their mixed targets (line 139-140): the
  core's default supervised loss.
- "remixmatch/mixed": cross-entropy of the (K+1) B_u mixed unlabeled rows against their mixed targets
  (use_xe, lines 141-145), weight w_match * ramp.
- "remixmatch/pre_mixup": cross-entropy of the first strong view, un-mixed, against q (lines 113-117),
  weight w_kl * ramp.
- "remixmatch/rotation": 4-way cross-entropy of a rotation head on the first strong view rotated by
  0/90/180/270 degrees, one rotation per quarter of the rows (random_rotate, lines 79-84 and 93-98; the
  official labels the quarters 0, 180, 90, 270 degrees, here k for k * 90 degrees counter-clockwise: the
  same task relabelled), weight w_rot, not ramped. The head is a Linear(feature_dim, 4) on the backbone's
  features (classifier_rot, lines 32-34, Glorot-normal kernel), added by an `ssl_build_model` wrapper: the
  model returns {"logits", "rotation"}. Needs square images (rotations keep the shape).
- ramp: linear from 0 at step 0 to 1 at `rampup_steps` (line 70: step in images / (warmup_kimg << 10);
  1024 kimg at batch 64 is 16384 steps).

Loss normalisation: every official term is already a mean over its own rows with the supervised term a mean
over the B labeled rows, the core's convention, so the weights are the official ones unchanged. The
pre-mixup and rotation losses are per original unlabeled row; they are tiled over the K + 1 mixed views of
that row so that they have one value per row of `batch.x_u` (same mean; per-row unlabeled weights, e.g.
DS3L's, apply to them as to the mixed term).

Defaults: the CTA run of cta_remixmatch.py:63-78 (T 0.5, beta 0.75, w_kl 0.5, w_match 1.5, w_rot 0.5,
warmup 1024 kimg, use_dm, use_xe, Adam lr 0.002, wd 0.02, batch 64) with K = 8, the paper's CIFAR-10
runs at 250-4000 labels (runs/ssl/cifar10.sh:18-19; the flag's default is 1, libml/augment.py:45). At 40
labels the official runs use K = 1, w_rot = 2 and a 8192-kimg warm-up (runs/ssl/cifar10.sh:22-23).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssltrain import ConfigError, LossTerm, hookimpl, linear_rampup
from ssltrain_plugins.mixmatch import (GuessAndMix, GuessAndMixConfig, check_temperature, guess_descriptions,
                                       guess_diagnostics, mix_into_batch, one_hot_targets, sharpen)


# --- the math: pure functions ------------------------------------------------------------------

def rotate_quarters(x: Tensor) -> tuple[Tensor, Tensor]:
    """Images [B, C, H, H] -> (rotated images, labels [B]): row i is rotated by k_i * 90 degrees
    counter-clockwise, k_i = 4 i // B (four near-equal quarters of the rows, as the official code)."""
    labels = torch.arange(x.shape[0], device=x.device) * 4 // max(x.shape[0], 1)
    parts = [torch.rot90(x[labels == k], k, (2, 3)) for k in range(4)]
    return torch.cat(parts), labels


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-sum_c targets_c log softmax(logits)_c per row, shape [N] (float32); targets are not differentiated."""
    return -(targets.detach().float() * logits.float().log_softmax(-1)).sum(-1)


class RotationHead(nn.Module):
    """A backbone (with `features(x)` and an nn.Linear `head`) plus a 4-way rotation classifier on the same
    features: forward(x) -> {"logits": head(z), "rotation": rotation(z)}."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        head = getattr(backbone, "head", None)
        if not isinstance(head, nn.Linear) or not hasattr(backbone, "features"):
            raise ConfigError(f"remixmatch.w_rot > 0 adds a rotation head on the backbone's features, which needs a "
                              f"model with `features(x)` and an nn.Linear `head`; got {type(backbone).__name__} "
                              f"(head {type(head).__name__}); set remixmatch.w_rot=0 or use a built-in backbone")
        self.backbone = backbone
        self.rotation = nn.Linear(head.in_features, 4)
        nn.init.xavier_normal_(self.rotation.weight)  # glorot_normal_initializer (remixmatch_no_cta.py:34)
        nn.init.zeros_(self.rotation.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.backbone.features(x)
        return {"logits": self.backbone.head(z), "rotation": self.rotation(z)}


# --- the plugin ----------------------------------------------------------------------------------

class ReMixMatch(GuessAndMix):
    """Anchored label guessing and MixUp in `ssl_modify_batch`, the interleaved forward, the "remixmatch/mixed",
    "remixmatch/pre_mixup" and "remixmatch/rotation" terms, and the rotation head."""

    incompatible = {"mixmatch": "both guess labels and mix the batch: use one of them",
                    "sla": "sla trains N*M joint (transformation, class) logits, remixmatch guesses and mixes "
                           "N-class targets"}

    descriptions = {
        "remixmatch/mixed": "w_match * ramp * mean over the (K+1)*B mixed unlabeled rows of the soft cross-entropy "
                            "to their mixed targets.",
        "remixmatch/pre_mixup": "w_kl * ramp * mean over the unlabeled rows of the cross-entropy of one un-mixed "
                                "strong view to the guess.",
        "remixmatch/rotation": "w_rot * mean cross-entropy of the rotation head on one rotated strong view.",
        **guess_descriptions("remixmatch"),
        "remixmatch/w_match": "The weight of remixmatch/mixed at this step (w_match after the linear ramp-up).",
    }

    class Config(GuessAndMixConfig):
        K: int = Field(8, ge=1, description="Strong views per unlabeled row (besides the weak anchor)")
        w_match: float = Field(1.5, ge=0, description="Weight of the mixed unlabeled cross-entropy after the ramp")
        w_kl: float = Field(0.5, ge=0, description="Weight of the pre-mixup cross-entropy after the ramp")
        w_rot: float = Field(0.5, ge=0, description="Weight of the rotation loss (not ramped); 0: no rotation head")
        rampup_steps: int = Field(16384, ge=0, description="Linear ramp of w_match and w_kl (1024 kimg at batch 64)")
        distribution_alignment: bool = Field(True, description="Align the guesses to the labeled class marginals "
                                                               "(official use_dm)")
        strong_labeled: bool = Field(True, description="The labeled rows get the strong augmentation (official)")

    def describe(self) -> str:
        c = self.config
        return (f"remixmatch/mixed x {c.w_match:g}, pre_mixup x {c.w_kl:g} after a linear ramp-up over "
                f"{c.rampup_steps} steps, rotation x {c.w_rot:g}; K={c.K}, T={c.T}, alpha={c.alpha}"
                + (", distribution_alignment" if c.distribution_alignment else ""))

    @hookimpl
    def ssl_configure(self, config, plugins):
        data, k = config.data, self.config.K
        if self.config.bn_mode == "interleave" and ((k + 1) * data.unlabeled_batch_size) % data.batch_size:
            raise ConfigError(f"remixmatch.bn_mode=interleave forwards chunks of data.batch_size rows, so "
                              f"(K + 1) * data.unlabeled_batch_size (({k} + 1) * {data.unlabeled_batch_size}) must be "
                              f"a multiple of data.batch_size ({data.batch_size}); change the batch sizes or K, or "
                              f"use remixmatch.bn_mode=concat")

    @hookimpl(wrapper=True)
    def ssl_build_model(self, input_shape, num_classes):
        check_temperature("remixmatch.T", self.config.T, num_classes)
        model = yield
        if self.config.w_rot == 0:
            return model
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ConfigError(f"remixmatch.w_rot={self.config.w_rot} trains a rotation head on rotated images, which "
                              f"needs square images [C, H, H]; this data has rows of shape {tuple(input_shape)}: "
                              f"set remixmatch.w_rot=0")
        return RotationHead(model)

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        cfg = self.config
        anchor = ctx.augment(batch.raw_u, "weak")
        strong = [ctx.augment(batch.raw_u, "strong") for _ in range(cfg.K)]
        with torch.no_grad():
            p = ctx.predict(anchor, update_bn=False).float().softmax(-1)
        y_l = one_hot_targets(batch.y_l, ctx.num_classes)
        if cfg.distribution_alignment:
            p = self.alignment(p, y_l)
        q = sharpen(p, cfg.T).detach()
        x_l = ctx.augment(batch.raw_l, "strong") if cfg.strong_labeled else batch.x_l
        hidden = batch.y_u_hidden
        mix_into_batch(batch, x_l, y_l, [anchor, *strong], q, cfg.alpha)
        batch.extras["remixmatch/pseudo_labels"] = q  # sharpened guesses [B_u, C] of raw_u (TensorBoard shows them)
        batch.extras["remixmatch/strong"] = strong[0]
        if cfg.w_rot > 0:
            batch.extras["remixmatch/rotated"], batch.extras["remixmatch/rotation_labels"] = rotate_quarters(strong[0])
        if ctx.is_log_step:
            self.diagnostics = guess_diagnostics("remixmatch", q, hidden)

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx, forward):
        cfg = self.config
        ramp = linear_rampup(ctx.step, cfg.rampup_steps)
        q = batch.extras["remixmatch/pseudo_labels"]
        views = batch.x_u.shape[0] // q.shape[0]  # K + 1 mixed views per unlabeled row
        terms = [LossTerm("remixmatch/mixed", soft_cross_entropy(outputs.logits_u, batch.y_u), weight=cfg.w_match * ramp)]
        if cfg.w_kl > 0:
            logits = forward(batch.extras["remixmatch/strong"], update_bn=False)["logits"]
            terms.append(LossTerm("remixmatch/pre_mixup", soft_cross_entropy(logits, q).repeat(views),
                                  weight=cfg.w_kl * ramp))
        if cfg.w_rot > 0:
            logits = forward(batch.extras["remixmatch/rotated"], update_bn=False)["rotation"]
            loss = F.cross_entropy(logits.float(), batch.extras["remixmatch/rotation_labels"], reduction="none")
            terms.append(LossTerm("remixmatch/rotation", loss.repeat(views), weight=cfg.w_rot))
        return terms

    @hookimpl
    def ssl_metrics(self, ctx):
        ramp = linear_rampup(ctx.step, self.config.rampup_steps)
        return {**self.diagnostics, "remixmatch/w_match": self.config.w_match * ramp}
