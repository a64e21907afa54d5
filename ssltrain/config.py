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
    """Base for every config section (core and plugins): unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassMismatch(Section):
    """Open-set split: labels from `seen_classes`; a fraction `unseen_ratio` of unlabeled data
    from the other classes; test on seen classes only."""

    name: str = "custom"
    seen_classes: list[int] = Field(min_length=1)
    unseen_ratio: float = Field(0.0, ge=0.0, le=1.0)


class AugmentConfig(Section):
    flip: bool = True  # images: random horizontal flip in the weak view
    pad: int = Field(4, ge=0)  # images: translate by up to this many pixels (reflect padding)
    noise_std: float = Field(0.0, ge=0.0)  # vectors: Gaussian noise of the weak view
    strong_noise_std: float = Field(0.3, ge=0.0)  # vectors: Gaussian noise of the strong view
    num_ops: int = Field(2, ge=0)  # images, strong view: RandAugment ops per sample
    cutout: float = Field(0.5, ge=0.0, le=1.0)  # images, strong view: cutout side / image side
    labeled_view: Literal["none", "weak", "strong"] = "weak"
    unlabeled_view: Literal["none", "weak", "strong"] = "weak"


class StreamConfig(Section):
    """How image files (data.name=image_folder) are decoded: in DataLoader worker processes, into fixed-size
    uint8 batches that are pinned, copied to the device without blocking and prefetched ahead."""

    workers: int | None = Field(None, ge=0)  # decoding processes per training process; None: the CPUs per
    # training process less one (at least 1, at most 12); 0: decode in the training process
    prefetch: int = Field(2, ge=1)  # batches each worker decodes ahead
    memory_budget_gb: float | None = Field(None, gt=0)  # streaming=auto streams when the decoded images need
    # more; None: a quarter of the device's memory (the GPU's, or the host's on CPU)
    crop: Literal["resize", "center", "random_resized_crop"] = "resize"  # how a file becomes image_size^2:
    # the whole image resized; the centre square; a random crop per step (training rows, streamed; test: centre)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random_resized_crop: area fraction range
    decode: Literal["workers", "device"] = "workers"  # device: JPEGs decoded in batches on the training device
    # (nvjpeg on CUDA), workers only read the files; other formats are decoded by the workers


class DataConfig(Section):
    name: str = "two_moons"
    root: str | None = None
    download: bool = False
    options: dict[str, Any] = {}  # dataset-specific, e.g. two_moons noise
    num_labeled: int | None = Field(8, ge=1)  # None: every train row with a label
    num_unlabeled: int | None = Field(None, ge=1)
    include_labeled_in_unlabeled: bool = True
    class_mismatch: ClassMismatch | None = None
    batch_size: int = Field(64, ge=1)  # labeled rows per step
    unlabeled_batch_size: int = Field(64, ge=1)  # drawn only when a plugin has an unlabeled loss
    normalize: bool = True  # images: per-channel mean/std after augmentation
    augment: AugmentConfig = AugmentConfig()
    image_size: int | None = Field(None, ge=1)  # image files: side in pixels of every decoded image (required)
    streaming: Literal["auto"] | bool = "auto"  # image files: stream from disk (true), hold decoded on the device
    # (false), or stream only when the decoded images exceed data.stream.memory_budget_gb (auto)
    on_bad_file: Literal["skip", "error"] = "skip"  # image files: skip unreadable files (each reported, counted) or stop
    stream: StreamConfig = StreamConfig()


class ModelConfig(Section):
    name: str = "mlp"
    options: dict[str, Any] = {}  # passed to the backbone constructor


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    decay_bias_and_norm: bool = False  # False: no weight decay on biases and norm layers
    schedule: str = "constant"  # a registered schedule: constant, cosine, step, fixmatch_cosine, or a plugin's
    warmup_steps: int = Field(0, ge=0)
    milestones: list[int] = []  # step schedule: multiply lr by gamma at these steps
    gamma: float = Field(0.1, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine: final lr / lr
    grad_clip: float | None = Field(None, gt=0)

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

    batch: Literal["global", "per_rank"] = "global"  # global: data.*batch_size split over ranks (same
    # math as one process, the run finishes sooner); per_rank: each rank draws the full batch sizes
    # (the global batch grows with the number of processes, same number of steps)
    sync_bn: bool | None = None  # None: SyncBatchNorm on CUDA (small per-GPU batches), off on CPU


class TrainConfig(Section):
    steps: int = Field(1000, ge=1)
    eval_every: int = Field(200, ge=1)
    log_every: int = Field(50, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)  # default: eval_every
    ema: float = Field(0.999, ge=0, lt=1)  # 0 turns EMA off
    median_last: int = Field(20, ge=1)  # summary: median test accuracy over the last N evaluations
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, none on CPU
    channels_last: bool | None = None  # None: on for images (faster convolutions on CUDA and CPU)
    compile: bool = False
    device: str = "auto"
    cpu_threads: int | None = Field(None, ge=1)  # torch intra-op threads on CPU; None: torch's default
    eval_batch_size: int = Field(1024, ge=1)
    distributed: DistributedConfig = DistributedConfig()
    progress: Literal["auto", "bar", "lines"] = "auto"

    @model_validator(mode="after")
    def _fill_checkpoint_every(self):
        if self.checkpoint_every is None:
            object.__setattr__(self, "checkpoint_every", self.eval_every)
        return self


class RunConfig(Section):
    seed: int = 0
    plugins: list[str] = []
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
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
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, not {type(raw).__name__}")
    return raw


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
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
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
        else:
            lines.append(f"{path}: {err['msg']} (got {err.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)
