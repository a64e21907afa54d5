"""Command line: `ssltrain train|config|eval|plugins|hooks`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from . import checkpoint, hookspecs
from .config import apply_overrides, load_yaml, resolve
from .errors import Interrupted, SSLTrainError
from .plugins import ENTRY_POINT_GROUP, discover, hooks_of, schemas


def load_config(path: str, overrides: list[str], classes: dict[str, type]):
    """YAML file + `--set` overrides -> validated RunConfig."""
    return resolve(apply_overrides(load_yaml(path), overrides or []), schemas(classes))


def cmd_train(args) -> int:
    from .loop import train
    classes = discover()
    config = load_config(args.config, args.set, classes)
    out = Path(args.out or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = train(config, out, resume=args.resume, classes=classes)
    print(f"test accuracy ({summary['evaluated_model']} model): {summary['test_top1']:.2f}%  "
          f"best: {summary['best_test_top1']:.2f}%  median of last {summary['median_last_n']}: "
          f"{summary['median_last_test_top1']:.2f}%  ({summary['steps']} steps, {summary['wall_seconds']:.1f}s)")
    print(f"run directory: {out}  (summary.json, metrics.jsonl, checkpoints/)")
    print(f"TensorBoard logs: {out / 'tb'}  ->  tensorboard --logdir {out / 'tb'}")
    return 0


def cmd_config(args) -> int:
    config = load_config(args.config, args.set, discover())
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def cmd_eval(args) -> int:
    from .loop import Trainer
    classes = discover()
    path = checkpoint.find(args.run, args.which)
    state = checkpoint.load(path)
    config = resolve(state["config"], schemas(classes))
    trainer = Trainer(config, path.parent.parent, classes)
    trainer.load_state_dict(state, weights_only=True)
    metrics = trainer.evaluate(state["step"])
    metrics.pop("confusion")
    metrics["step"], metrics["checkpoint"] = state["step"], str(path)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_plugins(args) -> int:
    dists = {ep.name: ep.dist for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name, cls in sorted(discover().items()):
        dist = dists.get(name)
        origin = f"{dist.name} {dist.version}" if dist is not None else "?"
        schema = getattr(cls, "Config", None)
        settings = ", ".join(f"{k}={v!r}" for k, v in schema().model_dump().items()) if schema else "-"
        print(f"{name}  [{origin}]  hooks: {', '.join(hooks_of(cls))}  config: {settings}")
    return 0


def cmd_hooks(args) -> int:
    for name in sorted(n for n in dir(hookspecs) if n.startswith("ssl_")):
        doc = (getattr(hookspecs, name).__doc__ or "").strip().splitlines()[0]
        kind = "one owner" if name in hookspecs.ONE_OWNER else "all plugins"
        print(f"{name}  ({kind})  {doc}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssltrain", description="Plugin-based semi-supervised learning trainer.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a config")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (wins over the YAML)")
    t.add_argument("--out", help="run directory (default: runs/<config>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("config", help="print the resolved config and validate it, without training")
    c.add_argument("config")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(func=cmd_config)
    e = sub.add_parser("eval", help="evaluate a run directory or checkpoint file")
    e.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    e.add_argument("--which", choices=["last", "best"], default="last")
    e.set_defaults(func=cmd_eval)
    sub.add_parser("plugins", help="list installed plugins").set_defaults(func=cmd_plugins)
    sub.add_parser("hooks", help="list the hooks plugins can implement").set_defaults(func=cmd_hooks)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except SSLTrainError as exc:
        code = 130 if isinstance(exc, Interrupted) else 2
        print(f"ssltrain: error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("ssltrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ssltrain plugins | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
