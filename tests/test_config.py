"""Config resolution: overrides win over the YAML, and bad input gets a message with the fix."""
from __future__ import annotations

import pytest

from conftest import make_config
from ssltrain import ConfigError
from ssltrain.config import apply_overrides, load_yaml, resolve
from ssltrain.plugins import discover, schemas


def resolved(raw, *overrides):
    return resolve(apply_overrides(raw, list(overrides)), schemas(discover()))


def test_public_overrides_win_over_yaml():
    raw = {"seed": 0, "plugins": ["pi_model"], "data": {"num_labeled": 8}, "train": {"steps": 1000}}
    config = resolved(raw, "plugins=[]", "train.steps=200", "data.num_labeled=250", "seed=3")
    assert config.plugins == [] and config.train.steps == 200
    assert config.data.num_labeled == 250 and config.seed == 3
    assert raw["train"]["steps"] == 1000  # the loaded YAML is not mutated


def test_override_creates_nested_keys_and_plugin_sections():
    config = resolved({}, "model.options.hidden=[4, 4]", "pi_model.weight=3", "plugins=[pi_model]")
    assert config.model.options == {"hidden": [4, 4]}
    assert config.plugin("pi_model").weight == 3.0
    assert config.to_dict()["pi_model"]["rampup_steps"] is None  # default: 40% of train.steps


@pytest.mark.parametrize("override, message", [
    ("trian.steps=3", "unknown config key 'trian'.*did you mean 'train'"),
    ("train.step=3", "unknown config key 'train.step'.*did you mean 'steps'"),
    ("data.augment.noise=0.1", "'data.augment.noise'.*did you mean 'noise_std'"),
    ("pi_model.wieght=1", "'pi_model.wieght'.*did you mean 'weight'"),
    ("train.steps=abc", "train.steps: .*integer.*'abc'"),
    ("train.steps=0", "train.steps: .*greater than or equal to 1"),
    ("train.amp=fp8", "train.amp: .*'auto', 'none', 'bf16' or 'fp16'"),
    ("plugins=[pi_modle]", "plugin 'pi_modle'.*not installed.*did you mean 'pi_model'"),
    ("plugins=[pi_model, pi_model]", "lists a plugin twice"),
    ("noequals", "expected dotted.key=value"),
    ("seed.x=1", "seed is not a section"),
])
def test_bad_values_name_the_problem_and_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        resolved({"seed": 0}, override)


def test_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe loader: no object construction
        load_yaml(evil)


def test_checkpoint_every_defaults_to_eval_every():
    assert make_config("train.eval_every=7").train.checkpoint_every == 7


def test_all_shipped_configs_validate():
    from pathlib import Path
    for path in sorted(Path(__file__).parent.parent.glob("configs/*.yaml")):
        resolved(load_yaml(path))
