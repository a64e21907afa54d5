"""The training loop. Every hook call site of ssltrain is in this file.

    ssl_configure(config, plugins)                              # once: validate the combination
    model = ssl_build_model(config, num_classes, input_shape)   # one owner; wrappers may edit
    for step in range(start, steps):
        batch = draw(step)                                      # device tensors, default views
        ssl_modify_batch(batch, ctx)                            # plugins, in `plugins:` order
        closure(params=None, labeled_only=False):               # reruns the step's losses
            outputs = ssl_forward(model, batch, ctx, forward)
            sup     = ssl_supervised_loss(outputs, batch, ctx, forward)       # [B_l]
            terms   = ssl_unlabeled_loss(outputs, batch, ctx, forward)        # collected LossTerms
            w       = ssl_unlabeled_weights(outputs, batch, ctx)              # [B_u] or None
            total   = mean(sup) + sum(term.weight * mean(w * term.per_sample))
        result = ssl_optimizer_step(closure, model, optimizer, scaler, ctx)  # plugins may wrap
        scheduler.step(); ema.update()
        ssl_step_end(result, batch, ctx)
        every log_every:  ssl_metrics(result, ctx) -> TensorBoard      # host syncs: here (and the display, 1/s)
        every eval_every: evaluate with ssl_predict(ema model, x); ssl_evaluate_end(...)
        every checkpoint_every: ssl_state_dict(state) -> checkpoints/last.pt (atomic)
    resume: checkpoint -> ssl_load_state_dict(state); what a user sees: display.py, tblog.py
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path

import torch
from torch.func import functional_call

from . import checkpoint, distributed, rng
from .config import RunConfig, check_names, notes
from .data import Augmenter, batch_source, build_data
from .defaults import CoreDefaults
from .display import Display, header_lines
from .errors import Interrupted
from .evaluate import evaluate
from .losses import as_terms, read_means, reduce_term
from .optim import EMA, build_optimizer, build_scheduler, frozen_bn
from .plugins import build_manager, discover
from .signals import StopFlag
from .summary import best, hparams, write_summary
from .tblog import NullLogger, RunLogger, rates
from .types import LossResult, SSLBatch, StepContext


def validate(config: RunConfig, classes: dict[str, type] | None = None):
    """Every check a run makes before it loads data (`ssltrain config` runs the same): dataset and model
    names, the plugin combination, each plugin's `ssl_configure`. Returns the run's plugin manager and
    notes on settings that are valid but probably not meant."""
    check_names(config)
    pm = build_manager(config, classes if classes is not None else discover(), CoreDefaults(config))
    pm.hook.ssl_configure(config=config, plugins=list(config.plugins))
    return pm, notes(config)


class Trainer:
    """Builds a run from a validated config (plugins, data, model, optimizer) and trains it."""

    def __init__(self, config: RunConfig, run_dir: str | Path, classes: dict[str, type] | None = None,
                 display: Display | None = None, command: str | None = None):
        self.config, self.run_dir, self.display, self.command = config, Path(run_dir), display, command
        tc = config.train
        self.dist = distributed.setup(tc.device)
        self.device = self.dist.device
        amp = tc.amp if tc.amp != "auto" else ("bf16" if self.device.type == "cuda" else "none")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        if tc.cpu_threads:
            torch.set_num_threads(tc.cpu_threads)
        rng.seed_everything(config.seed)
        self.pm, self.notes = validate(config, classes)
        self.hook = self.pm.hook
        self.data = build_data(config, self.device)
        self.channels_last = tc.channels_last if tc.channels_last is not None else self.data.kind == "image"
        model = self.hook.ssl_build_model(config=config, num_classes=self.data.num_classes,
                                          input_shape=self.data.input_shape)
        self.model = distributed.prepare_model(model, self.dist, tc.distributed.sync_bn, self.channels_last)
        if self.dist.world > 1:  # the same init on every rank (DDP broadcasts rank 0's), then each rank its own augmentations
            torch.manual_seed(config.seed * 7919 + self.dist.rank)
        self.ema = EMA(self.model, tc.ema) if tc.ema > 0 else None
        self.optimizer = build_optimizer(self.model, config.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, config.optim, tc.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.train_model = distributed.wrap_ddp(self.model, self.dist, tc.distributed.sync_bn)
        if tc.compile:
            self.train_model = torch.compile(self.train_model)
        self.augment = Augmenter(config.data, self.data, self.channels_last)
        self.uses_unlabeled = any(getattr(impl.plugin, "uses_unlabeled", True)
                                  for impl in self.hook.ssl_unlabeled_loss.get_hookimpls())
        self.batch_l = self.dist.rank_batch(config.data.batch_size, tc.distributed.batch)
        self.batch_u = self.dist.rank_batch(config.data.unlabeled_batch_size, tc.distributed.batch) if self.uses_unlabeled else 0
        self.source = batch_source(self.data, config, self.dist, self.batch_l, self.batch_u)  # resident or streamed
        self.step = 0
        self.stop = StopFlag()  # SIGINT/SIGTERM during fit: finish the step, write a checkpoint, raise Interrupted
        self.history: list[list[float]] = []  # [step, test top1] per evaluation
        self.final_eval: dict[str, float] = {}  # the last evaluation's scalars, plugins' included
        self.seconds = {"wall": 0.0, "train": 0.0}
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # of the first session (kept on resume)

    # --- one step -----------------------------------------------------------------------------

    def autocast(self, enabled: bool = True):
        """`train.amp`'s autocast; enabled=False forces float32 even inside an outer autocast."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled and self.amp_dtype is not None)

    def predict(self, model, x):
        with self.autocast():
            return self.hook.ssl_predict(model=model, x=x)

    def guess(self, x, update_bn: bool = True):
        """Class scores of the current model (label guessing; call under no_grad)."""
        with contextlib.nullcontext() if update_bn else frozen_bn(self.model):
            return self.predict(self.train_model, x)

    def context(self, step: int, is_log: bool = False) -> StepContext:
        return StepContext(step=step, total_steps=self.config.train.steps, num_classes=self.data.num_classes,
                           device=self.device, amp_dtype=self.amp_dtype, predict=self.guess,
                           augment=self.augment.view, is_log_step=is_log)

    def draw(self, step: int) -> SSLBatch:
        """The batch of `step`: labeled (and, when a plugin uses them, unlabeled) rows with default views."""
        view, rows = self.config.data.augment, self.source.rows(step)  # this process's share, on the device
        raw_l, raw_u = self.augment.raw(rows.x_l), self.augment.raw(rows.x_u)
        return SSLBatch(x_l=self.augment.view(raw_l, view.labeled_view), y_l=self.data.y_hidden[rows.idx_l],
                        x_u=self.augment.view(raw_u, view.unlabeled_view), raw_l=raw_l, raw_u=raw_u,
                        y_u_hidden=self.data.y_hidden[rows.idx_u], idx_u=rows.idx_u, idx_l=rows.idx_l)

    def forward_fn(self, params=None):
        """The model call of a closure: the (compiled) model, or a functional call on `params`
        with copied buffers, so that a virtual step changes nothing in the real model."""
        buffers = None if params is None else {n: b.clone() for n, b in self.model.named_buffers()}

        def forward(x, update_bn: bool = True, autocast: bool = True) -> dict:
            with self.autocast(autocast), (contextlib.nullcontext() if update_bn else frozen_bn(self.model)):
                out = self.train_model(x) if params is None else functional_call(self.model, (params, buffers), (x,))
            return out if isinstance(out, dict) else {"logits": out}
        return forward

    def make_closure(self, batch: SSLBatch, ctx: StepContext):
        hook = self.hook

        def closure(params=None, labeled_only: bool = False) -> LossResult:
            forward = self.forward_fn(params)
            b = dataclasses.replace(batch, x_u=batch.x_u[:0]) if labeled_only else batch
            model = self.train_model if params is None else self.model
            outputs = hook.ssl_forward(model=model, batch=b, ctx=ctx, forward=forward)
            sup = hook.ssl_supervised_loss(outputs=outputs, batch=b, ctx=ctx, forward=forward)
            total = sup.float().mean()
            reduced, terms, weights = {"supervised": total}, [], None
            if not labeled_only:
                terms = as_terms(hook.ssl_unlabeled_loss(outputs=outputs, batch=b, ctx=ctx, forward=forward))
                weights = hook.ssl_unlabeled_weights(outputs=outputs, batch=b, ctx=ctx) if terms else None
                for term in terms:
                    reduced[term.name] = reduce_term(term, weights, b.x_u.shape[0])
                    total = total + reduced[term.name]
            return LossResult(total=total, supervised=sup, terms=terms, reduced=reduced, weights=weights, outputs=outputs)
        return closure

    # --- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict:
        tc, hook, main = self.config.train, self.hook, self.dist.is_main
        display = self.display or (Display(self.run_dir, tc.progress) if main else NullLogger())
        logger = RunLogger(self.run_dir, self.step, tc.steps, self.data.classes, self.pm) if main else NullLogger()
        display.header(header_lines(self))
        logger.run_config(self.config, hparams(self.config), self.step)
        sums: dict[str, torch.Tensor] = {}
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        rows_per_step = (self.batch_l + self.batch_u) * self.dist.world
        t_start = t_log = time.perf_counter()
        steps_since_log, eval_seconds = 0, 0.0
        with self.stop, logger, display:
            display.start(self.step, tc.steps, tc.eval_every)
            self.model.train()
            for step in range(self.step, tc.steps):
                done = step + 1
                is_log = done % tc.log_every == 0 or done == tc.steps
                ctx = self.context(step, is_log)
                batch = self.draw(step)
                drawn_hidden = batch.y_u_hidden  # the drawn rows' labels (pseudo-label pictures only)
                hook.ssl_modify_batch(batch=batch, ctx=ctx)
                result = hook.ssl_optimizer_step(closure=self.make_closure(batch, ctx), model=self.model,
                                                 optimizer=self.optimizer, scaler=self.scaler, ctx=ctx)
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update()
                hook.ssl_step_end(result=result, batch=batch, ctx=ctx)
                total = result.loss.total.detach()
                first_bad = torch.where(torch.isfinite(total) | (first_bad >= 0), first_bad, step)
                for name, value in {"total": total, **result.loss.reduced}.items():
                    sums[name] = sums[name] + value.detach() if name in sums else value.detach()
                steps_since_log += 1
                self.step = done
                display.tick(done, sums, steps_since_log, self.optimizer.param_groups[0]["lr"])
                is_eval = done % tc.eval_every == 0 or done == tc.steps
                # one process stops at once; several agree at a log step (no per-step collective)
                stopping = self.stop.requested if self.dist.world == 1 else is_log and self.dist.any(self.stop.requested)
                is_ckpt = done % tc.checkpoint_every == 0 or done == tc.steps or stopping
                if is_log or is_eval or is_ckpt:
                    now = time.perf_counter()
                    values = read_means(sums, first_bad, steps_since_log, self.dist, self.run_dir / "checkpoints")
                    values.update(rates(self.optimizer, steps_since_log, rows_per_step, now - t_log))
                    for extra in hook.ssl_metrics(result=result, ctx=ctx) if is_log else ():  # ctx.is_log_step
                        values.update({k: float(v.detach() if torch.is_tensor(v) else v) for k, v in (extra or {}).items()})
                    logger.train_row(done, values)
                    display.logged(done, values)
                    sums, steps_since_log, t_log = {}, 0, now
                if is_eval:
                    t0 = time.perf_counter()
                    display.evaluating(done)
                    metrics = self.evaluate(done, logger)
                    logger.pseudo_labels(batch, drawn_hidden, done)
                    display.evaluated(done, metrics, best(self.history))
                    took = time.perf_counter() - t0
                    eval_seconds, t_log = eval_seconds + took, t_log + took  # throughput without evaluations
                if is_ckpt:
                    self.save_checkpoint(time.perf_counter() - t_start, eval_seconds)
                    t_start, eval_seconds = time.perf_counter(), 0.0
                if stopping:
                    raise Interrupted(f"stopped by signal at step {done}; checkpoint written to "
                                      f"{self.run_dir / 'checkpoints' / 'last.pt'}; continue with --resume")
            summary = write_summary(self)
            logger.summary(summary, self.step)
            display.result(summary, self.run_dir)
        return summary

    def evaluate(self, step: int, logger: RunLogger | None = None) -> dict:
        """Test metrics of the EMA model (when EMA is on) through `ssl_predict`."""
        model = self.ema.module if self.ema is not None else self.model
        model.eval()
        prepare = functools.partial(self.augment, name="none")
        test = self.source.test_batches(self.config.train.eval_batch_size)  # this process's shard
        metrics = evaluate(lambda x: self.predict(model, prepare(x)), test, self.data.num_classes, self.device,
                           sum_=self.dist.sum_)
        metrics["evaluated_model"] = "ema" if self.ema is not None else "online"
        if logger is not None:
            self.hook.ssl_evaluate_end(model=model, data=self.data, prepare=prepare, metrics=metrics, step=step,
                                       logger=logger)
            self.history.append([step, metrics["top1"]])
            self.final_eval = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            logger.evaluation(step, metrics, best(self.history)[1])
        self.model.train()
        return metrics

    # --- checkpoints and summary -----------------------------------------------------------------

    def state_dict(self) -> dict:
        plugin_state: dict = {}
        self.hook.ssl_state_dict(state=plugin_state)
        return checkpoint.trainer_state(self, plugin_state)

    def save_checkpoint(self, wall: float, eval_seconds: float) -> None:
        self.seconds["wall"] += wall
        self.seconds["train"] += wall - eval_seconds
        state = self.state_dict()
        if self.dist.is_main:
            checkpoint.save(state, self.run_dir / "checkpoints" / "last.pt")
            if self.history and self.history[-1][0] == self.step and self.history[-1][1] >= max(t for _, t in self.history):
                checkpoint.save(state, self.run_dir / "checkpoints" / "best.pt")
        self.dist.barrier()

    def load_state_dict(self, state: dict, weights_only: bool = False) -> None:
        checkpoint.restore_weights(self, state)
        if not weights_only:
            checkpoint.restore_training(self, state)
            self.hook.ssl_load_state_dict(state=state["plugins"])


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, classes: dict[str, type] | None = None,
          command: str | None = None) -> dict:
    """Train `config` into `run_dir` (or continue it from checkpoints/last.pt); returns the summary.
    `command`: the command line recorded in summary.json (default: this process's)."""
    run_dir = Path(run_dir)
    checkpoint.check_run_dir(run_dir, resume)
    display = Display(run_dir, config.train.progress) if distributed.is_main_process() else NullLogger()
    with display:
        display.header([f"ssltrain: run directory {run_dir}", f"ssltrain: loading {config.data.name} ..."])
        trainer = Trainer(config, run_dir, classes, display, command)
        if resume:
            state = checkpoint.load(checkpoint.find(run_dir))
            checkpoint.check_same_run(state["config"], config.to_dict())
            trainer.load_state_dict(state)
            if trainer.step >= config.train.steps:  # nothing to train: say so, show the summary again
                summary = write_summary(trainer)
                display.finished(summary, run_dir)
                return summary
        checkpoint.write_run_files(trainer, resume)
        return trainer.fit()
