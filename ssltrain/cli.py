"""Command line: `ssltrain train|config|eval|plugins|keys|hooks` (`ssltrain COMMAND --help` for each)."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import shlex
import shutil
import sys
import textwrap
import time
import typing
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from . import __version__, checkpoint, hookspecs
from .config import CORE_KEYS, RunConfig, apply_overrides, load_yaml, resolve
from .errors import ConfigError, Interrupted, SSLTrainError
from .plugins import ENTRY_POINT_GROUP, discover, hooks_of, schemas


def load_config(path: str, overrides: list[str], classes: dict[str, type]):
    """YAML file + `--set` overrides -> validated RunConfig."""
    return resolve(apply_overrides(load_yaml(path), overrides or []), schemas(classes))


def default_run_dir(config_path: str, root: Path = Path("runs")) -> Path:
    """runs/<config name>-<date>-<time> (a new one), with runs/latest pointing at it."""
    base = f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = root / base, 1
    while out.exists():  # two runs started within a second
        n += 1
        out = root / f"{base}-{n}"
    root.mkdir(parents=True, exist_ok=True)
    latest = root / "latest"
    try:
        if latest.is_symlink() or not latest.exists():
            latest.unlink(missing_ok=True)
            latest.symlink_to(out.name, target_is_directory=True)
    except OSError:  # e.g. no symlinks on this file system: the printed path is enough
        pass
    return out


def cmd_train(args) -> int:
    from .loop import train
    classes = discover()
    config = load_config(args.config, args.set, classes)
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out RUN_DIR, the run to continue (e.g. --out runs/latest)")
    out = Path(args.out) if args.out else default_run_dir(args.config)
    train(config, out, resume=args.resume, classes=classes, command=shlex.join(["ssltrain", *args.argv]))
    return 0


def cmd_config(args) -> int:
    from .loop import validate
    classes = discover()
    config = load_config(args.config, args.set, classes)
    _, notes = validate(config, classes)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    for note in notes:
        print(f"ssltrain: note: {note}", file=sys.stderr)
    print(f"ssltrain: {args.config} is valid (the checks `train` makes before it loads data)", file=sys.stderr)
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
    confusion = metrics.pop("confusion")
    metrics["step"], metrics["checkpoint"] = state["step"], str(path)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"{path}: step {state['step']:,}, {metrics['evaluated_model']} model, {config.data.name} test set "
          f"({sum(map(sum, confusion)):,} rows)")
    print(f"  top-1 accuracy  {metrics['top1']:6.2f}%")
    print(f"  ece             {metrics['ece']:6.2f}%   (expected calibration error, 15 bins)")
    print(f"  nll             {metrics['nll']:7.4f}   (nats per row)")
    for key, value in metrics.items():
        if "/" in key and isinstance(value, (int, float)):
            print(f"  {key:<15} {value:7.4g}")
    width = max(len(c) for c in trainer.data.classes)
    print(f"\n  {'class':<{width}}  accuracy   rows  most often confused with")
    for i, (name, acc) in enumerate(zip(trainer.data.classes, metrics["per_class_top1"])):
        row = confusion[i]
        wrong = max((c for c in range(len(row)) if c != i), key=lambda c: row[c], default=None)
        confused = f"{trainer.data.classes[wrong]} ({row[wrong]})" if wrong is not None and row[wrong] else "-"
        print(f"  {name:<{width}}  {acc:7.2f}%  {sum(row):5d}  {confused}")
    return 0


def cmd_plugins(args) -> int:
    classes = discover()
    if args.name:
        if args.name not in classes:
            raise ConfigError(f"no plugin named {args.name!r} is installed{_close(args.name, classes)}; "
                              f"installed: {', '.join(sorted(classes))}")
        return _show_plugin(args.name, classes[args.name])
    dists = {ep.name: ep.dist for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name, cls in sorted(classes.items()):
        dist = dists.get(name)
        origin = f"{dist.name} {dist.version}" if dist is not None else "?"
        schema = getattr(cls, "Config", None)
        settings = ", ".join(f"{k}={v!r}" for k, v in schema().model_dump().items()) if schema else "-"
        print(f"{name}  [{origin}]  hooks: {', '.join(hooks_of(cls))}  config: {settings}")
    print("`ssltrain plugins NAME` shows one plugin's settings with their types, defaults and descriptions",
          file=sys.stderr)
    return 0


def _show_plugin(name: str, cls: type) -> int:
    ep = next(ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name)
    dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "?"
    doc = inspect.getdoc(sys.modules[cls.__module__]) or inspect.getdoc(cls) or ""
    print(f"{name}  ({ep.value}, from {dist})")
    print(_wrap(doc.split("\n\n")[0], "  "))
    print(f"\nhooks: {', '.join(hooks_of(cls))}")
    for other, reason in getattr(cls, "incompatible", {}).items():
        print(_wrap(f"cannot run with {other}: {reason}", "", "  "))
    schema = getattr(cls, "Config", None)
    print(f"\nsettings (the `{name}:` section of the YAML, or --set {name}.KEY=VALUE):")
    print(settings_table(schema) if schema is not None else "  none")
    return 0


def cmd_keys(args) -> int:
    classes = discover()
    sections = {k: RunConfig.model_fields[k].annotation for k in CORE_KEYS}
    chosen = args.section or "all"
    if chosen != "all" and chosen not in sections:
        if chosen in classes:
            return _show_plugin(chosen, classes[chosen])
        raise ConfigError(f"no config section {chosen!r}{_close(chosen, [*sections, *classes])}; core sections: "
                          f"{', '.join(sections)}; plugin sections: {', '.join(sorted(classes))}")
    print(f"core settings ({', '.join(sections)}); a plugin's: `ssltrain plugins NAME`")
    print(settings_table(RunConfig, only=None if chosen == "all" else [chosen]))
    return 0


def _type_name(annotation) -> str:
    """int, float | None, 'weak' | 'strong', list[int], ..."""
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return "section" if hasattr(annotation, "model_fields") else annotation.__name__
    return re.sub(r"\b(typing|ssltrain\.config)\.", "", str(annotation)).replace("NoneType", "None")


def _bounds(metadata) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >="}
    return ", ".join(f"{symbol} {getattr(m, k)}" for m in metadata for k, symbol in symbols.items()
                     if getattr(m, k, None) is not None)


def settings_table(model, prefix: str = "", only: list[str] | None = None) -> str:
    """Every key of a pydantic section (nested sections flattened to dotted keys): type and bounds, default,
    description."""
    rows = []

    def walk(section, path):
        for key, field in section.model_fields.items():
            if field.exclude or (only is not None and not path and key not in only):
                continue
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, f"{path}{key}.")
                continue
            kind = _type_name(sub) + (f" ({b})" if (b := _bounds(field.metadata)) else "")
            default = "required" if field.is_required() else yaml.safe_dump(
                field.get_default(call_default_factory=True), default_flow_style=True, width=10**6).split("\n")[0]
            rows.append((prefix + path + key, kind, default, field.description or ""))
    walk(model, "")
    width = max(len(r[0]) for r in rows) + 2
    columns = shutil.get_terminal_size((100, 24)).columns
    out = []
    for key, kind, default, text in rows:
        out.append(f"  {key:<{width}}{kind}   default {default}")
        if text:
            out.append(_wrap(text, " " * (width + 4), width=columns))
    return "\n".join(out)


def cmd_hooks(args) -> int:
    for name in sorted(n for n in dir(hookspecs) if n.startswith("ssl_")):
        kind = "one owner" if name in hookspecs.ONE_OWNER else "all plugins"
        print(f"{name}  ({kind})")
        print(_wrap(first_sentence(getattr(hookspecs, name).__doc__ or ""), "    "))
    print("\nThe whole contracts: docs/plugins.md, or help(ssltrain.hookspecs.HOOK_NAME).")
    return 0


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, however it is wrapped ("e.g. x" does not end it)."""
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(?=\s+[A-Z`]|$)", paragraph)
    return match.group(1) if match else paragraph


def _wrap(text: str, indent: str, subsequent: str | None = None, width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((100, 24)).columns
    return textwrap.fill(text, width=max(width, 60), initial_indent=indent,
                         subsequent_indent=indent if subsequent is None else subsequent)


def _close(name: str, choices) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


SET_HELP = ("override one config value (repeat for more); KEY is a dotted path into the YAML, VALUE is parsed "
            "as YAML and wins over the file; quote it for the shell when it has spaces or brackets: "
            "--set train.steps=200 --set 'plugins=[pi_model, vat]' --set 'data.options={noise: 0.2}'")
TRAIN_EXAMPLES = """examples:
  ssltrain train configs/quickstart.yaml                        # run directory runs/quickstart-<time>, runs/latest
  ssltrain train configs/quickstart.yaml --set plugins=[]       # the supervised baseline on the same labels
  ssltrain train configs/mixmatch_cifar10.yaml --set data.num_labeled=250 --set seed=1 --out runs/mm250-s1
  ssltrain train configs/mixmatch_cifar10.yaml --out runs/mm250-s1 --resume --set train.steps=2000000

what you see: a header (device, data, model, plugins, run directory, the tensorboard command), a live display
(steps, it/s without evaluations, remaining time, every loss term and the lr; plain lines when not a terminal),
one line per evaluation, and the result. The run directory holds config.yaml, console.log, train.jsonl,
metrics.jsonl, summary.json, checkpoints/ and tb/ (README, "What you see")."""


def parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="ssltrain", formatter_class=formatter,
                                description="Plugin-based semi-supervised learning trainer (PyTorch + pluggy).",
                                epilog="`ssltrain COMMAND --help` explains each command, with examples.")
    p.add_argument("--version", action="version",
                   version=f"ssltrain {__version__} (python {platform.python_version()})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train a config into a run directory", formatter_class=formatter,
                       description="Train CONFIG.yaml (with --set overrides) into a run directory.",
                       epilog=TRAIN_EXAMPLES)
    t.add_argument("config", metavar="CONFIG.yaml", help="the run's YAML file (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    t.add_argument("--out", metavar="RUN_DIR", help="the run directory (default: runs/<config name>-<date>-<time>, "
                                                     "with runs/latest pointing at the newest)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from checkpoints/last.pt; only train.* settings may differ "
                        "(e.g. --set train.steps=N to train longer)")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("config", help="validate a config as `train` does and print it resolved",
                       formatter_class=formatter,
                       description="Run every check `train` makes before loading data (keys, types, ranges, dataset "
                                   "and model names, the plugin combination, the plugins' own checks) and print the "
                                   "resolved config (every key with its value) as YAML. Notes go to stderr.",
                       epilog="examples:\n  ssltrain config configs/quickstart.yaml\n"
                              "  ssltrain config configs/quickstart.yaml --set 'plugins=[pi_model, vat]' > run.yaml")
    c.add_argument("config", metavar="CONFIG.yaml", help="the YAML file to check")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    c.set_defaults(func=cmd_config)
    e = sub.add_parser("eval", help="evaluate a run's checkpoint on the test set", formatter_class=formatter,
                       description="Evaluate a checkpoint (the EMA model when EMA is on) on the run's test set and "
                                   "print top-1, calibration and per-class accuracy.",
                       epilog="examples:\n  ssltrain eval runs/latest\n"
                              "  ssltrain eval runs/latest --which best --json\n"
                              "  ssltrain eval runs/mm250-s1/checkpoints/last.pt")
    e.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or a .pt checkpoint file")
    e.add_argument("--which", choices=["last", "best"], default="last",
                   help="for a run directory: its last checkpoint (the end of training, default) or the best one "
                        "(the evaluation with the highest test top-1); ignored for a .pt file")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    e.set_defaults(func=cmd_eval)
    pl = sub.add_parser("plugins", help="list installed plugins, or show one plugin's settings",
                        formatter_class=formatter,
                        description="Without NAME: every installed plugin with its package, hooks and settings. "
                                    "With NAME: its description, hooks, incompatibilities and every setting with "
                                    "its type, default and description.",
                        epilog="examples:\n  ssltrain plugins\n  ssltrain plugins mixmatch")
    pl.add_argument("name", nargs="?", metavar="NAME", help="a plugin name (as in `plugins:`)")
    pl.set_defaults(func=cmd_plugins)
    k = sub.add_parser("keys", help="every core config key with its type, default and description",
                       formatter_class=formatter,
                       epilog="examples:\n  ssltrain keys\n  ssltrain keys train\n  ssltrain keys mixmatch")
    k.add_argument("section", nargs="?", metavar="SECTION", help="a core section (seed, plugins, data, model, optim, "
                                                                  "train) or a plugin name")
    k.set_defaults(func=cmd_keys)
    h = sub.add_parser("hooks", help="list the hooks a plugin can implement, with their contracts' first sentences",
                       description="Every hook with its kind (one owner or all plugins) and the first sentence of its "
                                   "contract; the full contracts are in docs/plugins.md.")
    h.set_defaults(func=cmd_hooks)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
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
