"""DS3L: safe deep SSL for unseen-class unlabeled data (Guo et al., ICML 2020; methods.md section 3).

A meta-network maps each unlabeled row's predicted class distribution to a weight in (0, 1)
(`ssl_unlabeled_weights`). The core multiplies every weighted unlabeled term of every other active
plugin by these weights, so DS3L combines with any SSL plugin (`[pi_model, ds3l]`,
`[mixmatch, ds3l]`, ...) without code specific to it. Each step, `ssl_optimizer_step` (a wrapper)
first runs the meta step (learning to reweight, labeled data as the meta set):

1. loss = closure(params=θ), whose weights keep their graph to the meta-net parameters α;
2. θ̂ = θ − inner_lr · ∇θ loss, functional and with the graph kept (plain SGD, as the official code);
3. meta loss = labeled loss of θ̂ (closure(params=θ̂, labeled_only=True)); an Adam step on α only;

then the real step (the core's default or the next wrapper), in which the weights are detached from
α: the classifier cannot lower its loss by shrinking the weights. The closure with `params` calls
the model functionally on copied buffers, so the meta step leaves the real parameters and batch-norm
statistics untouched.

Weights are self-normalised within the batch (w / mean(w), so the core's mean(w · Ω) equals
Σ w Ω / Σ w), as in the official code; `normalize_weights: false` gives the paper's unnormalised form,
with which the meta-net can switch the unlabeled terms off globally.

Precision and compilation: the meta step always runs on the uncompiled model (the functional closure
calls the raw module; `train.compile` only affects the real step) and without the grad scaler, so
`train.amp: fp16` is rejected (fp16 second-order gradients would under- or overflow unscaled);
`bf16` and `none` are supported. Cost: two extra forwards and a double backward per step; measured
3.8x the time of a pi_model step (small_cnn width 16, Fashion-MNIST, 64 + 64 rows, 1 CPU thread).

Loss weights and deviations (docs/fidelity.md). The official loss (guolz-ml/DS3L train.py:105, 116-118,
144-145) is sum_l CE / (B_l + B_u) + lambda(t) * sum_u w Omega / sum_u w, lambda(t) = 10 exp(-5 (1 - t/200k)^2):
the weighted term is a (self-normalised) mean over the unlabeled rows, the cross-entropy a sum over the
labeled rows divided by the whole batch. Against the core's labeled mean the SSL coefficient is
10 * (B_l + B_u) / B_l, i.e. `pi_model: {weight: 20}` at B_l = B_u (the weighted plugin's own weight and
ramp; the official ramp spans the whole run, `rampup_steps: <train.steps>`). The official virtual step
differentiates that whole-batch-normalised loss, so its inner lr 1e-3 corresponds to
inner_lr = 1e-3 * B_l / (B_l + B_u) here (5e-4 at equal batches); not converted: to first order the
meta-gradient is proportional to the inner step and the meta-net's Adam ignores its scale. The meta-net's
input is the classifier's live prediction in the virtual step (train.py:113: not detached, so the weights'
dependence on θ enters θ̂), detached in the real step (train.py:140-141, no_grad); done the same here.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ssltrain import ConfigError, SSLPlugin, Section, all_reduce_mean, hookimpl, logits_of


def build_meta_net(num_classes: int, hidden: int) -> nn.Module:
    """The weighting MLP of the official code: C -> hidden -> 1, ReLU, sigmoid applied by `sample_weights`."""
    return nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def sample_weights(meta_net: nn.Module, logits: Tensor, detach_input: bool = True) -> Tensor:
    """w = sigmoid(meta_net(softmax(logits))), shape [N], float32, each in (0, 1).

    detach_input=True: the class distribution is detached, only the meta-net's parameters get gradients.
    False (the official virtual step, guolz-ml/DS3L train.py:107-113): the weights also depend on the
    classifier's parameters through its predictions."""
    return torch.sigmoid(meta_net((logits.detach() if detach_input else logits).float().softmax(-1))).squeeze(-1)


def self_normalize(w: Tensor) -> Tensor:
    """w / mean(w): the core's mean(w' · l) then equals Σ w l / Σ w (constant weights -> plain mean)."""
    return w / w.mean()


def virtual_step(params: dict[str, Tensor], loss: Tensor, lr: float) -> dict[str, Tensor]:
    """θ̂ = θ − lr · ∇θ loss for every tensor in `params` (unused ones are kept), with the graph kept
    (create_graph) so that θ̂ stays differentiable in whatever `loss` depends on. Changes nothing in place."""
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
    return {n: p if g is None else p - lr * g for (n, p), g in zip(params.items(), grads)}


def meta_update(closure, params: dict[str, Tensor], inner_lr: float, optimizer: torch.optim.Optimizer):
    """One learning-to-reweight step of the meta-net whose parameters `optimizer` holds.

    closure(params=..., labeled_only=...) returns an object with `.total` (the loss) and `.weights`
    (the unlabeled weights, None when no unlabeled term is weighted); the weights must carry their
    graph to the meta-net. Virtual step θ̂ = θ − inner_lr ∇θ total, then one optimizer step on the
    meta-net against the labeled loss of θ̂ (its gradients stay in `.grad`). Returns the meta loss
    (detached), or None when the weights do not enter the loss (nothing to learn from).
    """
    loss = closure(params=params)
    if loss.weights is None:
        return None
    fast = virtual_step(params, loss.total, inner_lr)
    meta_loss = closure(params=fast, labeled_only=True).total
    meta_params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    meta_loss.backward(inputs=meta_params)
    for p in meta_params:  # under torchrun every rank takes the same meta step
        all_reduce_mean(p.grad)
    optimizer.step()
    return meta_loss.detach()


def auroc(scores: Tensor, positive: Tensor) -> Tensor:
    """Area under the ROC curve of `scores` for telling `positive` rows (bool) from the others:
    P(score of a positive > score of a negative) + 0.5 P(tie), from average ranks (Mann-Whitney U).
    0-dim float64 tensor, no host sync; NaN when either class is empty."""
    values, inverse, counts = torch.unique(scores.detach().double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based average rank of each tie group
    n_pos = positive.sum().double()
    n_neg = positive.numel() - n_pos
    return (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def weight_stats(w: Tensor, seen: Tensor) -> dict[str, Tensor]:
    """Mean weight of seen-class and of unseen-class rows (`seen`: bool) and the weights' AUROC for telling
    them apart (seen = positive); each entry only where it is defined."""
    out = {}
    has_seen, has_unseen = bool(seen.any()), bool((~seen).any())
    if has_seen:
        out["ds3l/weight_seen"] = w[seen].mean()
    if has_unseen:
        out["ds3l/weight_unseen"] = w[~seen].mean()
    if has_seen and has_unseen:
        out["ds3l/weight_auroc"] = auroc(w, seen)
    return out


class DS3L(SSLPlugin):
    """Per-sample unlabeled weights from a meta-net trained through a virtual step (module docstring)."""

    descriptions = {
        "ds3l/meta_loss": "The meta-net's objective: supervised loss after the virtual step (mean since the last "
                          "point).",
        "ds3l/weight_seen": "Mean raw weight (meta-net output, in [0, 1]) of unlabeled rows whose hidden class is "
                            "a seen class.",
        "ds3l/weight_unseen": "Mean raw weight (in [0, 1]) of unlabeled rows of an unseen or unknown class.",
        "ds3l/weight_auroc": "AUROC in [0, 1] of the weights for telling seen-class rows from the others (0.5: "
                             "chance, 1: seen rows always weigh more).",
    }

    class Config(Section):
        meta_lr: float = Field(6e-5, gt=0, description="Adam lr of the meta-net (official; 'needs careful tuning')")
        inner_lr: float = Field(1e-3, gt=0, description="Lr of the virtual plain-SGD step")
        hidden: int = Field(100, ge=1, description="Hidden width of the meta-net")
        normalize_weights: bool = Field(True, description="w / mean(w) within the batch (official); False: the paper's "
                                                          "form")
        eval_rows: int = Field(5000, ge=1, description="Unlabeled rows weighed at each evaluation (diagnostics)")

    def __init__(self, config=None):
        super().__init__(config)
        self.seed = 0
        self.meta_net: nn.Module | None = None  # built on the training device at the first step
        self.meta_optimizer: torch.optim.Optimizer | None = None
        self._restore: dict | None = None  # checkpointed state, loaded once the meta-net exists
        self._in_meta_step = False  # weights keep their graph to the meta-net only inside the meta step
        self._real_weights: Tensor | None = None  # raw weights of the latest real step (diagnostics)
        self._window: dict[str, list[Tensor]] = {"weights": [], "seen": [], "meta_loss": []}

    @hookimpl
    def ssl_configure(self, config, plugins):
        if config.train.amp == "fp16":
            raise ConfigError("ds3l: the meta step (a second-order virtual step) runs without the grad scaler, "
                              "so train.amp=fp16 is not supported; use train.amp=bf16 or train.amp=none")
        if list(plugins) == [self.name]:
            raise ConfigError("ds3l weights the unlabeled loss terms of other plugins and has none of its own; "
                              "list an SSL plugin before it, e.g. plugins: [pi_model, ds3l]")
        self.seed = config.seed

    def _ensure_meta_net(self, ctx) -> nn.Module:
        """The meta-net and its Adam, built on first use on the training device. The init draws from a
        forked RNG seeded with the run seed, so building it never shifts the run's random stream
        (a resumed run stays identical to an uninterrupted one)."""
        if self.meta_net is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                net = build_meta_net(ctx.num_classes, self.config.hidden)
            self.meta_net = net.to(ctx.device)
            self.meta_optimizer = torch.optim.Adam(self.meta_net.parameters(), lr=self.config.meta_lr)
            if self._restore is not None:
                self._load(self._restore)
        return self.meta_net

    @hookimpl
    def ssl_unlabeled_weights(self, outputs, ctx):
        net = self._ensure_meta_net(ctx)
        if self._in_meta_step:  # official: the meta-net's input keeps its graph to the classifier (train.py:113)
            w = sample_weights(net, outputs.logits_u, detach_input=False)
        else:
            with torch.no_grad():
                w = sample_weights(net, outputs.logits_u)
            self._real_weights = w
        return self_normalize(w) if self.config.normalize_weights else w

    @hookimpl(wrapper=True)
    def ssl_optimizer_step(self, closure, model, ctx):
        self._ensure_meta_net(ctx)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._in_meta_step = True
        try:
            meta_loss = meta_update(closure, params, self.config.inner_lr, self.meta_optimizer)
        finally:
            self._in_meta_step = False
        self._real_weights = None
        result = yield
        if meta_loss is not None:
            result.extras["ds3l/meta_loss"] = meta_loss
        if self._real_weights is not None:
            result.extras["ds3l/weights"] = self._real_weights
        return result

    @hookimpl
    def ssl_step_end(self, result, batch):
        if "ds3l/meta_loss" in result.extras:
            self._window["meta_loss"].append(result.extras["ds3l/meta_loss"])
        w = result.extras.get("ds3l/weights")
        if w is not None:
            self._window["weights"].append(w)
            self._window["seen"].append(batch.y_u_hidden >= 0)

    @hookimpl
    def ssl_metrics(self):
        """Since the last log step: the meta loss, the mean raw weight of seen-class and unseen-class
        unlabeled rows (from the hidden labels; -1 = unseen or unknown) and the weights' AUROC for
        telling them apart (seen = positive). Absent when undefined (e.g. no unseen rows)."""
        window, self._window = self._window, {k: [] for k in self._window}
        out = {}
        if window["meta_loss"]:
            out["ds3l/meta_loss"] = torch.stack(window["meta_loss"]).mean()
        if window["weights"]:
            out.update(weight_stats(torch.cat(window["weights"]), torch.cat(window["seen"])))
        return out

    @hookimpl
    def ssl_evaluate_end(self, model, data, prepare, metrics):
        """The same statistics over `eval_rows` unlabeled rows spread over the unlabeled set, weighed from
        the evaluated model's un-augmented predictions (eval mode), as `eval/ds3l/...` and in final_eval."""
        if self.meta_net is None:
            return
        idx = data.unlabeled_idx[:: max(1, len(data.unlabeled_idx) // self.config.eval_rows)]
        with torch.no_grad():
            w = torch.cat([sample_weights(self.meta_net, logits_of(model(prepare(data.train_x[part]))))
                           for part in idx.split(500)])
        metrics.update({k: float(v) for k, v in weight_stats(w, data.y_hidden[idx] >= 0).items()})

    @hookimpl
    def ssl_state_dict(self, state):
        if self.meta_net is not None:
            state[self.name] = {"meta_net": self.meta_net.state_dict(),
                                "meta_optimizer": self.meta_optimizer.state_dict()}
        elif self._restore is not None:
            state[self.name] = self._restore

    @hookimpl
    def ssl_load_state_dict(self, state):
        self._restore = state.get(self.name)
        if self._restore is not None and self.meta_net is not None:
            self._load(self._restore)

    def _load(self, saved: dict) -> None:
        self.meta_net.load_state_dict(saved["meta_net"])
        self.meta_optimizer.load_state_dict(saved["meta_optimizer"])
        self._restore = None
