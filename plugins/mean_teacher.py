"""Mean Teacher (Tarvainen & Valpola 2017), faithful to the authors' PyTorch code (CuriousAI/mean-teacher,
pytorch/; cited as file:line at commit HEAD of that repository).

The teacher is an exponential moving average of the student's weights; the student is pulled towards
the teacher's predictions on a second, independently augmented view of every row of the batch:

- EMA update after every optimizer step, with the official warm-up: decay
  alpha_k = min(1 - 1 / (k + 1), ema_decay) after the k-th step (main.py:189-193, called at main.py:289-290),
  so that early on the teacher is the plain average of the student's weights so far. The official teacher
  starts from its own random initialisation (main.py:69-70), which the warm-up averages in with weight
  1/(k+1); here it starts as a copy of the student (as USB's EMA), so the warm-up average is exact.
- Consistency cost: (1/C) ||softmax(student) - softmax(teacher)||^2 per row, gradient to the student only
  (losses.py:15-27 `softmax_mse_loss`, the default `consistency_type` mse, cli.py:67-69; the teacher's
  logits are detached at main.py:244). The student's logits are the main forward's (`outputs.logits_*`);
  the teacher's come from its forward on another draw of the same augmentation (`TransformTwice` of a
  4-px translation and a flip, datasets.py:45-50, the two inputs of main.py:215: our "weak" view), in train mode (main.py:212: batch statistics, and its running statistics
  are not read by the loss), without gradient.
- Weight: consistency * exp(-5 (1 - t)^2), t = step / rampup_steps clipped to 1 (main.py:399-401,
  ramps.py:19-26). The official ramp counts epochs; CIFAR-10 uses 5 epochs (experiments/cifar10_test.py:43)
  of 46000 // 97 = 474 steps (the two-stream sampler's length, data.py:131-132, at 4000 labels: 46000
  unlabeled rows, 128 - 31 of them per step), hence 2370 steps.

Defaults are the CIFAR-10 experiment's (experiments/cifar10_test.py:42-44): consistency 100 (the CLI
default is None: consistency off, cli.py:65), ramp 5 epochs; `ema_decay` is the CLI default 0.999
(cli.py:63; the CIFAR-10 runs use 0.99 at 4000 labels and 0.97 at 1000, cifar10_test.py:63,75). Not
built: the optional second "residual" head (`logit_distance_cost`, main.py:246-252; off by default,
cli.py:72).

Loss normalisation. The official total is (1/N) sum_labeled CE + w (1/N) sum_all-rows consistency
(main.py:254 and 263: `size_average=False` sums divided by the minibatch size N, which holds both the
labeled and the unlabeled rows, and the consistency runs on every row). With our batch of B_l labeled
and B_u unlabeled rows (N = B_l + B_u), dividing by B_l / N gives the core's convention (supervised
mean over labeled rows):

    mean_l CE + w * mean_l consistency + w * (B_u / B_l) * mean_u consistency

so this plugin returns "mean_teacher/consistency" on the unlabeled rows with weight w * B_u / B_l (the
unlabeled weights of `ssl_unlabeled_weights`, e.g. DS3L, apply to it) and "mean_teacher/labeled" on the
labeled rows with weight w (weighted=False). Our total is N / B_l times the official one: a constant
factor, the same for every term (to replay the official SGD step, scale its lr by B_l / N; Adam does not
see it). USB (semilearn/algorithms/meanteacher/meanteacher.py:61-69) drops the labeled rows' consistency
and averages the two losses separately; its line 55 also takes the student's logits from the teacher's
output, so its consistency is zero and has no gradient: not followed.

The teacher and the core's evaluation EMA (`train.ema`). The teacher is this plugin's own EMA
(`ssltrain.EMA`): it needs the official warm-up and its own decay, and it must exist whether or not the
core's EMA is on. The core keeps evaluating its own EMA of the same student; with `train.ema` equal to
`mean_teacher.ema_decay` the two differ only by the warm-up, whose effect decays as ema_decay^k, so the
evaluated model is the teacher the official code reports (main.py:112-115 keeps the EMA model's
accuracy). The teacher's buffers (batch-norm statistics) are copied from the student at each update.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ssltrain import (EMA, LossTerm, PluginContractError, SSLPlugin, Section, frozen_bn, hookimpl, logits_of,
                      sigmoid_rampup)
from ssltrain_plugins.pi_model import consistency_mse


# --- the math: pure functions ------------------------------------------------------------------

def ema_decay_at(steps_done: int, decay: float) -> float:
    """The official EMA decay after `steps_done` optimizer steps: min(1 - 1 / (steps_done + 1), decay)
    (the true average of the weights until the exponential average weights the past more)."""
    return min(1.0 - 1.0 / (steps_done + 1), decay)


def consistency_weights(weight: float, n_l: int, n_u: int) -> tuple[float, float]:
    """(unlabeled-term weight, labeled-term weight) for the core's convention, from the official
    whole-batch average with N = n_l + n_u rows: (weight * n_u / n_l, weight)."""
    return weight * n_u / n_l, weight


# --- the plugin ----------------------------------------------------------------------------------

class MeanTeacher(SSLPlugin):
    """An EMA teacher (this plugin's own), its targets in `ssl_modify_batch`, the consistency terms
    "mean_teacher/consistency" (unlabeled rows) and "mean_teacher/labeled", the teacher update in
    `ssl_step_end`, and the teacher in checkpoints."""

    incompatible = {"mixmatch": "mixmatch replaces the unlabeled rows by mixed views, mean_teacher's targets "
                                "are the teacher's predictions on the drawn rows",
                    "remixmatch": "remixmatch replaces the unlabeled rows by mixed views, mean_teacher's "
                                  "targets are the teacher's predictions on the drawn rows"}

    descriptions = {
        "mean_teacher/consistency": "consistency * ramp * (B_u / B_l) * mean over the unlabeled rows of "
                                    "(1/C)||softmax(student) - softmax(teacher)||^2 (the whole-batch average).",
        "mean_teacher/labeled": "consistency * ramp * mean over the labeled rows of the same softmax MSE.",
        "mean_teacher/teacher_acc_pct": "Share of the unlabeled batch whose teacher argmax is the hidden true label, "
                                        "in % (rows of unknown class excluded).",
        "mean_teacher/weight": "The official consistency coefficient at this step (after the sigmoid ramp-up).",
        "mean_teacher/ema_decay": "The teacher's EMA decay at this step: min(1 - 1/(t + 1), ema_decay).",
    }

    class Config(Section):
        consistency: float = Field(100.0, ge=0, description="w, the official coefficient of the whole-batch "
                                                              "average")
        rampup_steps: int = Field(2370, ge=0, description="Sigmoid ramp-up of w (5 official CIFAR-10 epochs); 0: none")
        ema_decay: float = Field(0.999, ge=0, lt=1, description="The teacher's EMA decay after the warm-up")
        view: Literal["weak", "strong"] = Field("weak", description="The teacher's (and student's) augmentation "
                                                                    "of each row")

    def __init__(self, config=None):
        super().__init__(config)
        self.student: torch.nn.Module | None = None
        self.teacher: EMA | None = None
        self._saved: dict | None = None  # teacher weights from a checkpoint, loaded when the teacher is built
        self.diagnostics: dict[str, Tensor] = {}  # at log steps: teacher_acc_pct

    def describe(self) -> str:
        c = self.config
        return (f"mean_teacher/consistency x {c.consistency:g} (whole-batch form) after a sigmoid ramp-up over "
                f"{c.rampup_steps} steps; teacher EMA {c.ema_decay}, {c.view} views")

    @hookimpl(wrapper=True, tryfirst=True)
    def ssl_build_model(self):
        """The outermost wrapper: keeps the model every other plugin built (the student)."""
        self.student = yield
        return self.student

    def _teacher(self) -> EMA:
        """The teacher, built at the first step as a copy of the student (on its device and memory format)."""
        if self.teacher is None:
            self.teacher = EMA(self.student, self.config.ema_decay)
            if self._saved is not None:
                self.teacher.module.load_state_dict(self._saved)
                self._saved = None
        return self.teacher

    @hookimpl
    def ssl_modify_batch(self, batch, ctx):
        teacher = self._teacher().module.train()  # official: the teacher runs in train mode
        x = torch.cat([ctx.augment(batch.raw_l, self.config.view), ctx.augment(batch.raw_u, self.config.view)])
        with torch.no_grad(), frozen_bn(teacher), torch.autocast(ctx.device.type, dtype=ctx.amp_dtype,
                                                                 enabled=ctx.amp_dtype is not None):
            logits = logits_of(teacher(x)).float()
        n_l = batch.raw_l.shape[0]
        batch.extras["mean_teacher/targets_l"], batch.extras["mean_teacher/targets_u"] = logits[:n_l], logits[n_l:]
        batch.extras["mean_teacher/pseudo_labels"] = logits[n_l:].softmax(-1)  # the teacher's [B_u, C] (TensorBoard)
        if ctx.is_log_step:
            hidden = batch.y_u_hidden
            seen = hidden >= 0
            self.diagnostics = {"mean_teacher/teacher_acc_pct": 100 * ((logits[n_l:].argmax(-1) == hidden) & seen).sum()
                                / seen.sum().clamp(min=1)}

    @hookimpl
    def ssl_unlabeled_loss(self, outputs, batch, ctx):
        targets_l, targets_u = batch.extras["mean_teacher/targets_l"], batch.extras["mean_teacher/targets_u"]
        n_l, n_u = outputs.logits_l.shape[0], outputs.logits_u.shape[0]
        if (n_l, n_u) != (targets_l.shape[0], targets_u.shape[0]):
            raise PluginContractError(f"mean_teacher: the teacher predicted {targets_l.shape[0]} labeled and "
                                      f"{targets_u.shape[0]} unlabeled rows, the forward returned {n_l} and {n_u} "
                                      f"(did another plugin change the batch's rows?)")
        w = self.config.consistency * sigmoid_rampup(ctx.step, self.config.rampup_steps)
        w_u, w_l = consistency_weights(w, n_l, n_u)
        return [LossTerm("mean_teacher/consistency", consistency_mse(outputs.logits_u, targets_u), weight=w_u),
                LossTerm("mean_teacher/labeled", consistency_mse(outputs.logits_l, targets_l), weight=w_l,
                         weighted=False)]

    @hookimpl
    def ssl_step_end(self, ctx):
        teacher = self._teacher()
        teacher.decay = ema_decay_at(ctx.step + 1, self.config.ema_decay)
        teacher.update()

    @hookimpl
    def ssl_metrics(self, ctx):
        return {**self.diagnostics,
                "mean_teacher/weight": self.config.consistency * sigmoid_rampup(ctx.step, self.config.rampup_steps),
                "mean_teacher/ema_decay": ema_decay_at(ctx.step + 1, self.config.ema_decay)}

    @hookimpl
    def ssl_state_dict(self, state):
        if self.teacher is not None:
            state[self.name] = {"teacher": self.teacher.module.state_dict()}

    @hookimpl
    def ssl_load_state_dict(self, state):
        saved = state.get(self.name)
        if saved is not None:
            if self.teacher is None:
                self._saved = saved["teacher"]
            else:
                self.teacher.module.load_state_dict(saved["teacher"])
