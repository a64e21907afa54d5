"""What a person sees while a run trains: the startup header, a live progress display, one line per
evaluation and the final result. Everything shown is also appended, as plain lines with the time, to
`run_dir/console.log`.

On a terminal the display is tqdm: a bar line (steps, elapsed time, remaining time, steps per second
without the evaluations) and, below it, the loss terms and the learning rate, wrapped to the terminal's
width. While the run evaluates, the bar says so. Elsewhere (a pipe, a file, CI) plain lines are printed
every 5% of the run (from the log steps' values) or 30 seconds.

The hot path stays free of host syncs: `tick` runs every step but reads the loop's accumulated on-device
loss sums (one transfer) only when `interval` seconds have passed.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from .losses import loss_tag

PLAIN_EVERY = (0.05, 30.0)  # plain lines: every 5% of the steps or 30 s, whichever comes first


def number(v: float, trim: bool = False) -> str:
    """A number for people: 4 significant digits, no exponent between 0.001 and 100000 (0.4123, 12.35,
    1500); outside it a short exponent (3.6e-6, 2.5e8). `trim` drops trailing zeros (0.003, not 0.003000)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    if 1e-3 <= abs(v) < 1e5:
        text = f"{v:.{max(0, 3 - math.floor(math.log10(abs(v))))}f}"
        return text.rstrip("0").rstrip(".") if trim and "." in text else text
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.removesuffix('.0') if trim else mantissa}e{int(exponent)}"


def duration(seconds: float) -> str:
    """1:02:03, 2:03 or 0:03."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def loss_items(values: dict[str, float]) -> list[str]:
    """'loss 0.41', '= supervised 0.30', '+ pi_model/consistency 0.11', 'lr 0.003': the total, the weighted
    terms that add up to it, and the learning rate, from TensorBoard-named values."""
    items = [f"loss {number(values['loss/total'])}"] if "loss/total" in values else []
    terms = [(tag[5:], v) for tag, v in values.items() if tag.startswith("loss/") and tag != "loss/total"]
    items += [f"{'=' if i == 0 else '+'} {name} {number(v)}" for i, (name, v) in enumerate(terms)]
    if "train/lr" in values:
        items.append(f"  lr {number(values['train/lr'], trim=True)}")
    return items


def wrap(items: list[str], width: int) -> list[str]:
    """Join items with spaces into lines of at most `width` characters (an item longer than that stands alone)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 1 + len(item.strip()) <= width:
            lines[-1] += " " + item
        else:
            lines.append(item.strip())
    return lines


class Display:
    """The console side of one run on the main process (see the module docstring)."""

    def __init__(self, run_dir: Path, mode: str = "auto", interval: float = 1.0, stream=None):
        self.stream = stream or sys.stdout
        self.live = mode == "bar" or (mode == "auto" and self.stream.isatty())
        self.interval = interval
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.log = open(Path(run_dir) / "console.log", "a", buffering=1)
        self.bar = None
        self.status: list = []  # tqdm lines below the bar: the loss terms
        self.values: dict[str, float] = {}  # the latest losses ("loss/...") and "train/lr" shown
        self.rate: float | None = None  # steps per second, evaluations excluded
        self.eval_seconds: list[float] = []

    # --- permanent lines ---------------------------------------------------------------------------

    def line(self, text: str = "") -> None:
        """A line that stays (above the live display); also written to console.log."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
        self.log.write(f"[{datetime.now():%Y-%m-%d %H:%M:%S}] {text}\n" if text else "\n")

    def header(self, lines: list[str]) -> None:
        for text in lines:
            self.line(text)

    # --- the live display --------------------------------------------------------------------------

    def start(self, step: int, total: int, eval_every: int) -> None:
        """Begin showing progress at `step` of `total`."""
        self.step, self.total, self.eval_every = step, total, eval_every
        self._tick_time = self._plain_time = time.perf_counter()
        self._tick_step = self._plain_step = step
        self._paused = 0.0  # evaluation seconds since the last tick
        if self.live:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=step, file=self.stream, dynamic_ncols=True, mininterval=3600,
                            desc="train", bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                     "[{elapsed}{postfix}]")

    def tick(self, step: int, sums: dict[str, torch.Tensor], count: int, lr: float) -> None:
        """Every step: at most once per `interval` seconds (for plain lines, per 30 s) read the mean of the
        accumulated loss sums (one device-to-host transfer) and redraw."""
        now = time.perf_counter()
        if now - self._tick_time < self.interval:
            return
        self._measure(step, now)
        plain_due = now - self._plain_time >= PLAIN_EVERY[1]
        if self.bar is None and not plain_due:
            return
        if count:
            names = list(sums)
            means = (torch.stack([sums[n].float() for n in names]) / count).tolist()
            self.values.update({loss_tag(n): v for n, v in zip(names, means)})
        self.values["train/lr"] = lr
        if self.bar is not None:
            self._draw(step)
        if plain_due:
            self._plain(step, now)

    def logged(self, step: int, values: dict[str, float]) -> None:
        """At a log step, with the values written to TensorBoard (means over all processes): a plain line
        every 5% of the run (printed when there is no live display; always in console.log)."""
        self.values.update({k: v for k, v in values.items() if k.startswith("loss/") or k == "train/lr"})
        now = time.perf_counter()
        if step >= self.total or step - self._plain_step >= PLAIN_EVERY[0] * self.total \
                or now - self._plain_time >= PLAIN_EVERY[1]:
            if self._tick_step < step:
                self._measure(step, now)
            self._plain(step, now)

    def _plain(self, step: int, now: float) -> None:
        self._plain_time, self._plain_step = now, step
        text = f"step {step}/{self.total}  " + " ".join(loss_items(self.values)) + f"  {self._speed()}"
        if self.bar is None:
            print(text, file=self.stream, flush=True)
        self.log.write(f"[{datetime.now():%Y-%m-%d %H:%M:%S}] {text}\n")

    def evaluating(self, step: int) -> None:
        """Shown while the evaluation runs (the display cannot refresh until it ends)."""
        self._eval_start = time.perf_counter()
        if self.bar is not None:
            self.bar.set_description_str("eval ", refresh=False)
            self.bar.set_postfix_str(f"evaluating at step {step} ...", refresh=False)
            self.bar.n = step
            self.bar.refresh()

    def evaluated(self, step: int, metrics: dict, best: tuple[int, float]) -> None:
        """One line per evaluation: test top-1, the best so far, calibration, the plugins' scalars."""
        seconds = time.perf_counter() - self._eval_start
        self._paused += seconds
        self.eval_seconds.append(seconds)
        line = (f"eval @ {step}: top-1 {metrics['top1']:.2f}%  best {best[1]:.2f}% (step {best[0]})  "
                f"ece {metrics['ece']:.2f}%  nll {number(metrics['nll'])}  {seconds:.1f}s")
        extra = [f"{k} {number(v)}" for k, v in metrics.items()
                 if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.line(line)
        for text in wrap(extra, self._width() - 6):
            self.line("      " + text)
        if self.bar is not None:
            self.bar.set_description_str("train", refresh=False)
            self._draw(step)

    def _measure(self, step: int, now: float) -> None:
        """Steps per second since the previous measurement, the evaluations' time taken out (smoothed)."""
        seconds = now - self._tick_time - self._paused
        if step > self._tick_step and seconds > 0:
            rate = (step - self._tick_step) / seconds
            self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate
        self._tick_time, self._tick_step, self._paused, self.step = now, step, 0.0, step

    def _speed(self) -> str:
        if not self.rate:
            return ""
        rate = f"{self.rate:,.0f}" if self.rate >= 100 else f"{self.rate:.{1 if self.rate >= 10 else 2}f}"
        evals_left = self.total // self.eval_every - self.step // self.eval_every
        per_eval = sum(self.eval_seconds) / len(self.eval_seconds) if self.eval_seconds else 0.0
        eta = (self.total - self.step) / self.rate + evals_left * per_eval
        return f"{rate} it/s  eta {duration(eta)}"

    def _width(self) -> int:
        return shutil.get_terminal_size((80, 24)).columns if self.bar is not None else 160

    def _draw(self, step: int) -> None:
        from tqdm import tqdm
        self.bar.n = step
        self.bar.set_postfix_str(self._speed().replace("  ", ", "), refresh=False)
        lines = wrap(loss_items(self.values), self._width() - 1)
        while len(self.status) < len(lines):
            self.status.append(tqdm(total=0, position=len(self.status) + 1, file=self.stream, bar_format="{desc}",
                                    dynamic_ncols=True, mininterval=3600))
        for i, bar in enumerate(self.status):
            bar.set_description_str(lines[i] if i < len(lines) else "", refresh=True)
        self.bar.refresh()

    # --- the end -----------------------------------------------------------------------------------

    def result(self, summary: dict, run_dir: Path) -> dict:
        """The final lines (below the live display's last state): accuracy, where the run's files are, how to
        look at them. Returns `summary`."""
        self._close_live()
        self.line(f"test accuracy ({summary['evaluated_model']} model): {summary['test_top1']:.2f}%   "
                  f"({summary['steps']:,} steps, {duration(summary['wall_seconds'])})")
        n = summary["median_last_n"]
        self.line(f"best: {summary['best_test_top1']:.2f}% at step {summary['best_step']:,}   median of the last "
                  f"{n} evaluation{'s' if n > 1 else ''}: {summary['median_last_test_top1']:.2f}%")
        self.line(f"run directory: {run_dir}")
        self.line("  files: summary.json metrics.jsonl train.jsonl console.log checkpoints/ tb/")
        self.line(f"TensorBoard: tensorboard --logdir {run_dir}")
        return summary

    def finished(self, summary: dict, run_dir: Path) -> dict:
        """`--resume` of a run that has no steps left: say so, then its result."""
        self.line(f"the run in {run_dir} already finished: step {summary['steps']} of {summary['steps']}; nothing "
                  f"to train (raise train.steps to continue it). Its result:")
        return self.result(summary, run_dir)

    def _close_live(self) -> None:
        for bar in [self.bar, *self.status]:
            if bar is not None:
                bar.close()
        self.bar, self.status = None, []

    def close(self, error: BaseException | None = None) -> None:
        if self.log.closed:
            return
        self._close_live()
        if error is not None:
            self.log.write(f"[{datetime.now():%Y-%m-%d %H:%M:%S}] stopped: {type(error).__name__}: {error}\n")
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exc)


def header_lines(trainer) -> list[str]:
    """The startup header: what runs where, on which data, with which plugins, and where to look."""
    config, data, tc = trainer.config, trainer.data, trainer.config.train
    from . import __version__
    device = trainer.device
    if device.type == "cuda":
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        threads = torch.get_num_threads()
        where = f"{device}, {threads} thread{'s' if threads > 1 else ''}"
    if trainer.dist.world > 1:
        where += f", {trainer.dist.world} processes"
    amp = {None: "off (fp32)", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}
    memory = "channels_last" if trainer.channels_last else "contiguous"
    unlabeled = f"{len(data.unlabeled_idx):,} unlabeled" + ("" if trainer.uses_unlabeled else " (not drawn)")
    shape = "x".join(str(d) for d in data.input_shape)
    params = sum(p.numel() for p in trainer.model.parameters())
    plugins = [f"{name}: {_describe(trainer.pm.get_plugin(name))}" for name in config.plugins]
    rows = [("device", f"{where} · amp {amp[trainer.amp_dtype]} · memory format {memory}"
             + (" · torch.compile" if tc.compile else "")),
            ("data", f"{config.data.name}: {data.num_classes} classes, {shape} {data.kind}s"),
            ("input", data.input_path),
            ("split", f"{len(data.labeled_idx):,} labeled · {unlabeled} · {len(data.test_y):,} test · "
                      f"seed {config.seed}"),
            ("model", f"{config.model.name}: {params:,} parameters" + (f" · EMA {tc.ema}" if tc.ema else "")),
            *[("plugins" if i == 0 else "", text) for i, text in enumerate(plugins or
                                                                     ["none: the supervised baseline"])],
            ("steps", f"{tc.steps:,} · eval every {tc.eval_every:,} · log every {tc.log_every:,} · "
                      f"checkpoint every {tc.checkpoint_every:,}"),
            ("run dir", str(trainer.run_dir)),
            ("watch", f"tensorboard --logdir {trainer.run_dir}"),
            *([("compare", f"tensorboard --logdir {trainer.run_dir.parent}   (every run in it, HParams table)")]
              if trainer.run_dir.parent.name == "runs" else []),
            *[("note", text) for text in trainer.notes]]
    lines = [f"ssltrain {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})"]
    for label, text in rows:  # wrapped to 80 columns, but for paths and commands (to copy whole)
        first, *rest = wrap(text.split(" "), 68) if label not in ("run dir", "watch", "compare") else [text]
        lines += [f"  {label:<8} {first}", *(f"  {'':<8}   {more}" for more in rest)]
    if trainer.step:
        lines.append(f"resuming from step {trainer.step:,} of {tc.steps:,}")
    return lines


def _describe(plugin) -> str:
    describe = getattr(plugin, "describe", None)
    if describe is not None:
        return describe()
    from .plugins import settings_text
    return settings_text(getattr(plugin, "config", None))
