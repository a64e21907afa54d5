"""Run configuration: YAML + `--set` overrides -> a validated `RunConfig`.

Core sections are pydantic models with unknown keys forbidden; each plugin declares its own
section as a pydantic model in its `Config` class attribute. Errors name the key's dotted
path, the closest valid key, and the expected type.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Section(BaseModel):
    """Base for every config section (core and plugins): unknown keys are errors, and so are
    infinite or NaN numbers (a weight, temperature or step of inf/nan cannot train in any precision)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ClassMismatch(Section):
    """Open-set split: labels from `seen_classes`; a fraction `unseen_ratio` of unlabeled data
    from the other classes; test on seen classes only."""

    name: str = Field("custom", description="A name for the split (shown in logs)")
    seen_classes: list[int] = Field(min_length=1, description="Dataset class ids that get labels (the label space)")
    unseen_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the unlabeled rows drawn from the "
                                "other classes (0: none)")


class AugmentConfig(Section):
    flip: bool = Field(True, description="Images: random horizontal flip in the weak and strong views")
    pad: int = Field(4, ge=0, description="Images: translate by up to this many pixels (reflect padding)")
    noise_std: float = Field(0.0, ge=0.0, description="Vectors: Gaussian noise std of the weak view")
    strong_noise_std: float = Field(0.3, ge=0.0, description="Vectors: Gaussian noise std of the strong view")
    num_ops: int = Field(2, ge=0, description="Images, strong view: RandAugment operations per sample")
    cutout: float = Field(0.5, ge=0.0, le=1.0, description="Images, strong view: cutout side / image side")
    labeled_view: Literal["none", "weak", "strong"] = Field("weak", description="View of the labeled rows")
    unlabeled_view: Literal["none", "weak", "strong"] = Field("weak", description="Default view of the unlabeled "
                                                              "rows (plugins draw their own views too)")


class StreamConfig(Section):
    """How image files (data.name=image_folder) are decoded: in DataLoader worker processes, into fixed-size
    uint8 batches that are pinned, copied to the device without blocking and prefetched ahead."""

    workers: int | None = Field(None, ge=0, description="Decoding processes per training process; None: the "
                                "CPUs per training process less one (1 to 12); 0: decode in the training process")
    prefetch: int = Field(2, ge=1, description="Batches each worker decodes ahead")
    memory_budget_gb: float | None = Field(None, gt=0, description="data.streaming=auto streams when the decoded "
                                           "images need more; None: a quarter of the device's memory (the GPU's, "
                                           "or the host's on CPU)")
    crop: Literal["resize", "center", "random_resized_crop"] = Field(
        "resize", description="How a file becomes image_size x image_size: the whole image resized, the centre "
        "square, or a random crop anew at every step (streamed training rows; evaluation: the centre)")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random_resized_crop: range of the area fraction")
    decode: Literal["workers", "device"] = Field("workers", description="device: JPEGs decoded in batches on the "
                                                 "training device (nvjpeg on CUDA) and the workers only read files")


class DataConfig(Section):
    name: str = Field("two_moons", description="Dataset: two_moons, fashion_mnist, cifar10, cifar100, svhn, stl10, "
                      "image_folder, tabular, sklearn, synthetic")
    root: str | None = Field(None, description="Where the dataset's files are; None: the dataset's default")
    download: bool = Field(False, description="Download torchvision datasets that are missing (needs internet)")
    options: dict[str, Any] = Field({}, description="Dataset-specific options, e.g. two_moons {noise: 0.1}")
    num_labeled: int | None = Field(8, ge=1, description="Labeled training rows, class-balanced, drawn with the "
                                    "seed; None: every train row with a label")
    num_unlabeled: int | None = Field(None, ge=1, description="Cap on the unlabeled rows; None: all the others")
    include_labeled_in_unlabeled: bool = Field(True, description="The labeled rows are also unlabeled rows")
    class_mismatch: ClassMismatch | None = Field(None, description="Open-set split (unseen classes among the "
                                                 "unlabeled rows); None: off")
    batch_size: int = Field(64, ge=1, description="Labeled rows per step")
    unlabeled_batch_size: int = Field(64, ge=1, description="Unlabeled rows per step, drawn only when a plugin "
                                      "has an unlabeled loss")
    normalize: bool = Field(True, description="Images: per-channel mean/std normalisation after augmentation")
    augment: AugmentConfig = Field(AugmentConfig(), description="Augmentation of the views")
    image_size: int | None = Field(None, ge=1, description="Image files: the side in pixels of every decoded "
                                   "image (required for image_folder)")
    streaming: Literal["auto"] | bool = Field("auto", description="Image files: stream from disk (true), hold "
                                              "decoded on the device (false), or stream when the decoded images "
                                              "exceed data.stream.memory_budget_gb (auto)")
    on_bad_file: Literal["skip", "error"] = Field("skip", description="Image files: skip an unreadable file "
                                                  "(reported with its path, counted) or stop the run")
    stream: StreamConfig = Field(StreamConfig(), description="Image files: how they are decoded and streamed")


class ModelConfig(Section):
    name: str = Field("mlp", description="Backbone: mlp, small_cnn, wrn (WRN-28-2), resnet32")
    options: dict[str, Any] = Field({}, description="Passed to the backbone constructor, e.g. {hidden: [128]}")


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = Field("adam", description="Optimizer (adamw: decoupled weight decay)")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD: Nesterov momentum")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW betas")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (L2 for sgd/adam, decoupled for adamw)")
    decay_bias_and_norm: bool = Field(False, description="False: no weight decay on biases and norm layers")
    schedule: str = Field("constant", description="A registered schedule: constant, cosine, step, fixmatch_cosine, "
                          "or a plugin's")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up of the learning rate, in steps")
    milestones: list[int] = Field([], description="Step schedule: multiply lr by gamma at these steps")
    gamma: float = Field(0.1, gt=0, description="Step schedule: the factor at each milestone")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine: final lr / lr")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this; None: off")

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        from .optim import SCHEDULES  # optim imports this module
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}{_suggest(name, SCHEDULES)}; registered: {sorted(SCHEDULES)} "
                             f"(plugins add schedules with ssltrain.register_schedule)")
        return name


class DistributedConfig(Section):
    """Only used under torchrun (more than one process)."""

    batch: Literal["global", "per_rank"] = Field(
        "global", description="global: data.*batch_size split over the processes (the math of one process, the run "
        "finishes sooner); per_rank: each process draws the full batch sizes (a larger global batch, same steps)")
    sync_bn: bool | None = Field(None, description="None: SyncBatchNorm on CUDA (small per-GPU batches), off on CPU")


class TrainConfig(Section):
    steps: int = Field(1000, ge=1, description="Optimizer steps of the run")
    eval_every: int = Field(200, ge=1, description="Steps between evaluations on the test set (and at the end)")
    log_every: int | None = Field(None, ge=1, description="Steps between TensorBoard/train.jsonl points; None: "
                                  "steps // 100 within [1, 50] (about 100 points on short runs)")
    checkpoint_every: int | None = Field(None, ge=1, description="Steps between checkpoints; None: eval_every")
    ema: float = Field(0.999, ge=0, lt=1, description="EMA decay of the evaluated weights; 0 turns EMA off")
    median_last: int = Field(20, ge=1, description="Summary: median test accuracy over the last N evaluations of "
                             "the second half of the run")
    amp: Literal["auto", "none", "bf16", "fp16"] = Field("auto", description="Mixed precision; auto: bf16 on CUDA, "
                                                         "none on CPU; fp16 uses a grad scaler")
    channels_last: bool | None = Field(None, description="None: on for images (faster convolutions on CUDA and CPU)")
    compile: bool = Field(False, description="torch.compile the training model")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    cpu_threads: int | None = Field(None, ge=1, description="Torch intra-op threads on CPU; None: torch's default")
    eval_batch_size: int = Field(1024, ge=1, description="Rows per forward during evaluation")
    distributed: DistributedConfig = Field(DistributedConfig(), description="Under torchrun only")
    progress: Literal["auto", "bar", "lines"] = Field("auto", description="Console display: a live bar on a "
                                                      "terminal (auto), always a bar, or plain lines")

    @model_validator(mode="after")
    def _fill_defaults(self):
        if self.checkpoint_every is None:
            object.__setattr__(self, "checkpoint_every", self.eval_every)
        if self.log_every is None:
            object.__setattr__(self, "log_every", min(max(self.steps // 100, 1), 50))
        return self


class RunConfig(Section):
    seed: int = Field(0, description="Seed of the labeled split, the initialisation and the data order")
    plugins: list[str] = Field([], description="Enabled plugins, in hook order; []: the supervised baseline")
    data: DataConfig = Field(DataConfig(), description="The dataset, the split and the batches")
    model: ModelConfig = Field(ModelConfig(), description="The backbone")
    optim: OptimConfig = Field(OptimConfig(), description="Optimizer and learning-rate schedule")
    train: TrainConfig = Field(TrainConfig(), description="Steps, evaluation, logging, precision, device")
    plugin_configs: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def plugin(self, name: str):
        """The validated config section of plugin `name`."""
        return self.plugin_configs[name]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, core sections then plugin sections (the run's config.yaml)."""
        out = self.model_dump(mode="json")
        for name, section in self.plugin_configs.items():
            out[name] = section.model_dump(mode="json")
        return out


CORE_KEYS = tuple(f for f in RunConfig.model_fields if f != "plugin_configs")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors say which file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass the path of a YAML file (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(str(path), exc)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, not {type(raw).__name__}")
    return raw


def _yaml_error(where: str, exc: yaml.YAMLError) -> str:
    """'<where>, line L, column C: <problem>' with a hint for the common mistakes."""
    mark = getattr(exc, "problem_mark", None)
    place = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    hint = ""
    if "\\t" in problem:  # PyYAML: "found character '\\t' that cannot start any token"
        hint = "; YAML indents with spaces only: replace the tab characters with spaces"
    elif where.startswith("--set"):
        hint = "; quote the whole --set argument for the shell, e.g. --set 'plugins=[pi_model, vat]'"
    return f"{where} is not valid YAML{place}: {problem}{hint}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) on a copy of `raw`."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.steps=200")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_error(f"--set {item!r}", exc)) from None
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def resolve(raw: dict[str, Any], plugin_schemas: dict[str, type[BaseModel] | None]) -> RunConfig:
    """Validate a raw config dict. `plugin_schemas` maps every installed plugin to its Config class."""
    core = {k: v for k, v in raw.items() if k in CORE_KEYS}
    sections = {k: v for k, v in raw.items() if k not in CORE_KEYS}
    for key in sections:
        if key not in plugin_schemas:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, [*CORE_KEYS, *plugin_schemas])}; "
                              f"top-level keys are the core sections {list(CORE_KEYS)} and installed plugin names")
    try:
        config = RunConfig.model_validate(core)
    except ValidationError as exc:
        raise ConfigError(_format(exc, RunConfig)) from None
    for name in config.plugins:
        if name not in plugin_schemas:
            raise ConfigError(f"plugin {name!r} in `plugins:` is not installed{_suggest(name, plugin_schemas)}; "
                              f"installed: {sorted(plugin_schemas)} (see `ssltrain plugins`)")
    if len(set(config.plugins)) != len(config.plugins):
        raise ConfigError(f"`plugins:` lists a plugin twice: {config.plugins}")
    for name in [*config.plugins, *(k for k in sections if k not in config.plugins)]:
        schema = plugin_schemas[name]
        given = sections.get(name) or {}
        if schema is None:
            if given:
                raise ConfigError(f"plugin {name!r} takes no settings; remove the `{name}:` section")
            continue
        if not isinstance(given, dict):
            raise ConfigError(f"`{name}:` must be a mapping of settings, not {type(given).__name__}")
        try:
            config.plugin_configs[name] = schema.model_validate(given)
        except ValidationError as exc:
            raise ConfigError(_format(exc, schema, prefix=name)) from None
    return config


def check_names(config: RunConfig) -> None:
    """The dataset (and its options) and the model exist: ConfigError naming the valid choices."""
    from .datasets import check_dataset  # datasets and models import torch; config stays light
    from .models import BACKBONES
    try:
        check_dataset(config.data.name, config.data.options)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    if config.model.name.lower() not in BACKBONES:
        raise ConfigError(f"model: unknown backbone {config.model.name!r}{_suggest(config.model.name, BACKBONES)}; "
                          f"valid names: {', '.join(sorted(BACKBONES))} (model.name)")


def notes(config: RunConfig) -> list[str]:
    """Settings that are valid but probably not what was meant, for the user to read (not errors)."""
    out = []
    unused = [name for name in config.plugin_configs if name not in config.plugins]
    if unused:
        out.append(f"sections {unused} configure plugins that are not enabled (plugins: {config.plugins}); "
                   f"they are validated and unused")
    tc = config.train
    if tc.eval_every > tc.steps:
        out.append(f"train.eval_every ({tc.eval_every}) is more than train.steps ({tc.steps}): the run evaluates "
                   f"once, at its end")
    return out


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section at `loc` inside `model` (for suggestions)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = getattr(field, "annotation", None) if field else None
        candidates = [sub, *getattr(sub, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _format(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            lines.append(f"unknown config key {path!r}{_suggest(str(loc[-1]), valid)}; valid keys here: {valid}")
        elif err["type"] == "list_type" and isinstance(err.get("input"), str):
            lines.append(f"{path}: expected a list, got {err['input']!r}; write a YAML list, e.g. "
                         f"{path}: [{err['input']}] in the file or --set '{path}=[{err['input']}]'")
        else:
            lines.append(f"{path}: {err['msg']} (got {err.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)
