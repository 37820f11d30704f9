"""Typed configs: YAML files, dotted overrides, and one-line errors that name the key."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from rmn.recipe.config import Config, ConfigError, from_dict, load_config, parse_override_value


def write(tmp_path, text: str, name: str = "c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    assert cfg == Config()
    cfg.model.routed_stages = [0, 2]
    cfg.optim.lr = 0.25
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_yaml_file_then_overrides_in_order(tmp_path):
    p = write(tmp_path, "model:\n  num_procedures: 4\noptim:\n  lr: 0.2\n  warmup_epochs: 2\nrun:\n")
    cfg = load_config(p, {"optim.lr": 0.05, "schedule.epochs": 70})
    assert cfg.model.num_procedures == 4
    assert cfg.optim.lr == 0.05  # the override wins over the file
    assert cfg.optim.warmup_epochs == 2.0 and isinstance(cfg.optim.warmup_epochs, float)  # int widens to float
    assert cfg.schedule.epochs == 70
    assert cfg.run == Config().run  # an empty section keeps the defaults


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads "1e-5" as a string; the config accepts it for float keys (the defaults are written so).
    cfg = load_config(write(tmp_path, "optim:\n  start_lr: 1e-5\n  end_lr: 2E-6\n"), {"optim.lr": parse_override_value("3e-2")})
    assert (cfg.optim.start_lr, cfg.optim.end_lr, cfg.optim.lr) == (1e-5, 2e-6, 3e-2)
    with pytest.raises(ConfigError, match=r"schedule\.epochs"):  # not for int keys
        load_config(None, {"schedule.epochs": "1e3"})


@pytest.mark.parametrize("text, key", [
    ("modle:\n  backbone: resnet18\n", "modle"),
    ("model:\n  backbon: resnet18\n", "model.backbon"),
    ("optim:\n  lr: fast\n", "optim.lr"),
    ("schedule:\n  epochs: '3'\n", "schedule.epochs"),
    ("schedule:\n  epochs: 3.5\n", "schedule.epochs"),
    ("schedule:\n  epochs: true\n", "schedule.epochs"),
    ("optim:\n  lr: true\n", "optim.lr"),
    ("data:\n  augment: 1\n", "data.augment"),
    ("data:\n  augment: 'yes please'\n", "data.augment"),
    ("model:\n  backbone: 18\n", "model.backbone"),
    ("model:\n  routed_stages: 2\n", "model.routed_stages"),
    ("model:\n  routed_stages: [0, a]\n", "model.routed_stages[1]"),
    ("run:\n  threads: 1.5\n", "run.threads"),
    ("model: 3\n", "model"),
])
def test_bad_file_entries_name_the_key(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert key in msg, msg
    assert str(p) in msg  # and the file
    assert "\n" not in msg


@pytest.mark.parametrize("override, key", [
    ({"optim.lr": "fast"}, "optim.lr"),
    ({"optim.lrr": 0.1}, "optim.lrr"),
    ({"optimiser.lr": 0.1}, "optimiser"),
    ({"lr": 0.1}, "lr"),
    ({"data.batch_size": 6.0}, "data.batch_size"),
    ({"run.tensorboard": 0}, "run.tensorboard"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, override)


@pytest.mark.parametrize("override, key", [
    ({"model.num_procedures": 0}, "model.num_procedures"),
    ({"model.attention": "cbam"}, "model.attention"),
    ({"model.memory_momentum": 1.5}, "model.memory_momentum"),
    ({"model.width_mult": 0}, "model.width_mult"),
    ({"data.batch_size": 0}, "data.batch_size"),
    ({"data.batch_size": 64, "data.micro_batch_size": 128}, "data.micro_batch_size"),
    ({"data.micro_batch_size": 0}, "data.micro_batch_size"),
    ({"data.workers": -1}, "data.workers"),
    ({"schedule.epochs": 0}, "schedule.epochs"),
    ({"schedule.epochs": 4, "schedule.stem_epochs": 5}, "schedule.stem_epochs"),
    ({"optim.optimizer": "adam"}, "optim.optimizer"),
    ({"optim.lr": 0}, "optim.lr"),
    ({"optim.lr": float("nan")}, "optim.lr"),
    ({"optim.warmup_epochs": -1}, "optim.warmup_epochs"),
    ({"optim.procedure_grad_scale": 0}, "optim.procedure_grad_scale"),
    ({"run.mode": "fast"}, "run.mode"),
    ({"run.progress": "spinner"}, "run.progress"),
    ({"run.keep_checkpoints": 0}, "run.keep_checkpoints"),
    ({"run.eval_every": 0}, "run.eval_every"),
])
def test_invalid_values_are_rejected_by_validate(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_bad_yaml_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    assert load_config(write(tmp_path, "", "empty.yaml")) == Config()


def test_parse_override_value_reads_yaml_scalars():
    assert parse_override_value("0.1") == 0.1
    assert parse_override_value("3") == 3
    assert parse_override_value("true") is True
    assert parse_override_value("null") is None
    assert parse_override_value("[0, 1]") == [0, 1]
    assert parse_override_value("resnet18") == "resnet18"
    assert parse_override_value("[oops") == "[oops"  # not YAML: the raw text (then type-checked)


def test_every_key_is_typed_and_settable_from_a_dict():
    """Each default survives from_dict(to_dict()): no key lacks a usable annotation."""
    cfg = Config()
    data = cfg.to_dict()
    assert from_dict(data) == cfg
    for section in data:
        for f in dataclasses.fields(getattr(cfg, section)):
            assert f.name in data[section]
    assert yaml.safe_load(cfg.to_yaml()) == data
