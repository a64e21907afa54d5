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
        every log_every:  ssl_metrics(result, ctx) -> TensorBoard      # the only host syncs
        every eval_every: evaluate with ssl_predict(ema model, x); ssl_evaluate_end(...)
        every checkpoint_every: ssl_state_dict(state) -> checkpoints/last.pt (atomic)
    resume: checkpoint -> ssl_load_state_dict(state)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path

import torch
import yaml
from torch.func import functional_call

from . import checkpoint, distributed, rng
from .config import RunConfig
from .data import Augmenter, batch_source, build_data, write_labeled
from .defaults import CoreDefaults
from .errors import ConfigError, Interrupted
from .evaluate import evaluate
from .losses import as_terms, read_means, reduce_term
from .optim import EMA, build_optimizer, build_scheduler, frozen_bn
from .plugins import build_manager, discover
from .signals import StopFlag
from .summary import write_summary
from .tblog import NullLogger, RunLogger
from .types import LossResult, SSLBatch, StepContext


class Trainer:
    """Builds a run from a validated config (plugins, data, model, optimizer) and trains it."""

    def __init__(self, config: RunConfig, run_dir: str | Path, classes: dict[str, type] | None = None):
        self.config, self.run_dir = config, Path(run_dir)
        tc = config.train
        self.dist = distributed.setup(tc.device)
        self.device = self.dist.device
        amp = tc.amp if tc.amp != "auto" else ("bf16" if self.device.type == "cuda" else "none")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        if tc.cpu_threads:
            torch.set_num_threads(tc.cpu_threads)
        rng.seed_everything(config.seed)
        self.pm = build_manager(config, classes if classes is not None else discover(), CoreDefaults(config))
        self.hook = self.pm.hook
        self.hook.ssl_configure(config=config, plugins=list(config.plugins))
        self.data = build_data(config, self.device)
        channels_last = tc.channels_last if tc.channels_last is not None else self.data.kind == "image"
        model = self.hook.ssl_build_model(config=config, num_classes=self.data.num_classes,
                                          input_shape=self.data.input_shape)
        self.model = distributed.prepare_model(model, self.dist, tc.distributed.sync_bn, channels_last)
        if self.dist.world > 1:  # the same init on every rank (DDP broadcasts rank 0's), then each rank its own augmentations
            torch.manual_seed(config.seed * 7919 + self.dist.rank)
        self.ema = EMA(self.model, tc.ema) if tc.ema > 0 else None
        self.optimizer = build_optimizer(self.model, config.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, config.optim, tc.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.train_model = distributed.wrap_ddp(self.model, self.dist, tc.distributed.sync_bn)
        if tc.compile:
            self.train_model = torch.compile(self.train_model)
        self.augment = Augmenter(config.data, self.data, channels_last)
        self.uses_unlabeled = any(getattr(impl.plugin, "uses_unlabeled", True)
                                  for impl in self.hook.ssl_unlabeled_loss.get_hookimpls())
        self.batch_l = self.dist.rank_batch(config.data.batch_size, tc.distributed.batch)
        self.batch_u = self.dist.rank_batch(config.data.unlabeled_batch_size, tc.distributed.batch) if self.uses_unlabeled else 0
        self.source = batch_source(self.data, config, self.dist, self.batch_l, self.batch_u)  # resident or streamed
        self.step = 0
        self.history: list[list[float]] = []  # [step, test top1] per evaluation
        self.final_eval: dict[str, float] = {}  # the last evaluation's scalars, plugins' included
        self.seconds = {"wall": 0.0, "train": 0.0}

    # --- one step -----------------------------------------------------------------------------

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

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

        def forward(x, update_bn: bool = True) -> dict:
            with self.autocast(), (contextlib.nullcontext() if update_bn else frozen_bn(self.model)):
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
        tc, hook = self.config.train, self.hook
        logger = RunLogger(self.run_dir, tc.steps, self.step, tc.progress) if self.dist.is_main else NullLogger()
        if self.step == 0:
            logger.text("config", "```\n" + yaml.safe_dump(self.config.to_dict(), sort_keys=False) + "\n```")
        sums: dict[str, torch.Tensor] = {}
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        stop = StopFlag()
        rows_per_step = (self.batch_l + self.batch_u) * self.dist.world
        t_start = t_log = time.perf_counter()
        steps_since_log, eval_seconds = 0, 0.0
        with stop, logger:
            self.model.train()
            for step in range(self.step, tc.steps):
                done = step + 1
                is_log = done % tc.log_every == 0 or done == tc.steps
                ctx = self.context(step, is_log)
                batch = self.draw(step)
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
                is_eval = done % tc.eval_every == 0 or done == tc.steps
                # one process stops at once; several agree at a log step (no per-step collective)
                stopping = stop.requested if self.dist.world == 1 else is_log and self.dist.any(stop.requested)
                is_ckpt = done % tc.checkpoint_every == 0 or done == tc.steps or stopping
                if is_log or is_eval or is_ckpt:
                    now = time.perf_counter()
                    values = read_means(sums, first_bad, steps_since_log, self.dist, self.run_dir / "checkpoints")
                    values["core/lr"] = self.optimizer.param_groups[0]["lr"]
                    values["core/samples_per_second"] = rows_per_step * steps_since_log / max(now - t_log, 1e-9)
                    for extra in hook.ssl_metrics(result=result, ctx=ctx):
                        values.update({k: float(v.detach() if torch.is_tensor(v) else v) for k, v in (extra or {}).items()})
                    logger.scalars(values, done)
                    logger.progress(done, {k: v for k, v in values.items() if k.startswith("loss/")})
                    sums, steps_since_log, t_log = {}, 0, now
                if is_eval:
                    t0 = time.perf_counter()
                    self.evaluate(done, logger)
                    eval_seconds += time.perf_counter() - t0
                if is_ckpt:
                    self.save_checkpoint(time.perf_counter() - t_start, eval_seconds)
                    t_start, eval_seconds = time.perf_counter(), 0.0
                if stopping:
                    raise Interrupted(f"stopped by signal at step {done}; checkpoint written to "
                                      f"{self.run_dir / 'checkpoints' / 'last.pt'}; continue with --resume")
        return write_summary(self)

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
            logger.evaluation(step, metrics)
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


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, classes: dict[str, type] | None = None) -> dict:
    """Train `config` into `run_dir` (or continue it from checkpoints/last.pt); returns the summary."""
    run_dir = Path(run_dir)
    trainer = Trainer(config, run_dir, classes)
    if resume:
        state = checkpoint.load(checkpoint.find(run_dir))
        checkpoint.check_same_run(state["config"], config.to_dict())
        trainer.load_state_dict(state)
        if trainer.step >= config.train.steps:
            return write_summary(trainer)
    elif (run_dir / "checkpoints" / "last.pt").exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        write_labeled(run_dir, trainer.data, resume)
        print(trainer.data.input_path, flush=True)  # until the startup header shows it
    trainer.dist.barrier()
    return trainer.fit()
