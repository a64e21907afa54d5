"""FixMatch (Sohn et al., NeurIPS 2020), faithful to google-research/fixmatch fixmatch.py (F) and USB
(microsoft/Semi-supervised-learning at 1ef4cbe) semilearn/algorithms/fixmatch/fixmatch.py (U).

Per step, one forward over cat(x_l, u_weak, u_strong) in train mode (F:99-104, U:53-57), then
- supervised: mean over the labeled rows of CE(logits_l, y_l) (F:108-109; the core's default);
- pseudo-label: q = softmax(sg(logits_weak)) (F:113), hard label argmax q (F:114, U:87-91 with hard_label True;
  `hard_label: false` gives softmax(logits_weak / T) soft targets, USB hooks/pseudo_label.py:46-48);
- mask: 1[max q >= tau] (F:116, USB hooks/masking.py:55-56);
- unlabeled term: mean over the B_u unlabeled rows of mask * CE(logits_strong, argmax q) (F:114-118,
  USB core/criterions/consistency.py:34-40), times lambda_u (F:131 `wu`, U:98).
The official total is loss_xe + wu * loss_xeu with both terms plain means (F:131): that is the loss
normalisation convention here, so `lambda_u` is the official coefficient unchanged (test_fixmatch pins it).

Defaults (F:165-176, USB config/classic_cv/fixmatch/fixmatch_cifar10_40_0.yaml): tau 0.95, lambda_u 1,
hard labels (T 0.5 only for soft labels), uratio 7 (B_u = 7 B_l: set data.unlabeled_batch_size = 7 *
data.batch_size), SGD lr 0.03 momentum 0.9 Nesterov, weight decay 5e-4 (F:122: kernels only; our default leaves
biases and norm weights undecayed), the cosine decay lr * cos(7 pi k / 16 K) (F:92-93: `optim.schedule:
fixmatch_cosine`), EMA 0.999 (F:85, 125). These are core settings: configs/fixmatch_fashion_mnist.yaml sets them.

Other plugins see FixMatch through generic fields: `outputs.y_u` is q (NS3L takes its negatives from it),
`outputs.logits_u` the strong logits that the masked term trains (DS3L weighs those rows; the core multiplies
its weights into the masked per-row loss). Views, forward and masks live in `pseudo_labeling`.
"""
from __future__ import annotations

from pydantic import Field

from ssltrain import hookimpl

from ssltrain_plugins.pseudo_labeling import PseudoLabelConfig, WeakStrongPlugin, confidence_mask, guessed_probs, guessers_except


class FixMatch(WeakStrongPlugin):
    """The "fixmatch/unlabeled" term: mask * CE(strong, pseudo-label of the weak view)."""

    incompatible = guessers_except("fixmatch")

    class Config(PseudoLabelConfig):
        threshold: float = Field(0.95, gt=0, le=1, description="Tau: confidence of the weak view's argmax to keep a row.")

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx):
        return self.masked_term(outputs, batch, ctx, confidence_mask(guessed_probs(outputs), self.config.threshold))
