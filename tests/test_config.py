"""Configs: typed merge, dotted overrides, unknown keys named with a suggestion, stable hash."""

from pathlib import Path

import pytest

from pretrain.config import load_pretrain_config
from sslbench.config import ConfigError, config_hash

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "simsiam_synthetic_r18.yaml"


def test_recipe_loads_with_typed_overrides():
    cfg = load_pretrain_config([RECIPE], ["optim.base_lr=0.1", "train.epochs=3"])
    assert cfg.optim.base_lr == 0.1 and isinstance(cfg.optim.base_lr, float)
    assert cfg.train.epochs == 3
    assert cfg.method.name == "simsiam" and cfg.method.stop_gradient is True


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("optim.base_lrr=0.1", "optim.base_lrr", "optim.base_lr"),
        ("method.stop_gradent=false", "method.stop_gradent", "method.stop_gradient"),
        ("trian.epochs=1", "trian", "train"),
    ],
)
def test_unknown_key_names_key_and_closest(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_pretrain_config([RECIPE], [override])
    assert repr(key) in str(err.value) and repr(suggestion) in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: simsiam\ntrain:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train\.epochz'"):
        load_pretrain_config([bad])


def test_wrong_type_and_unknown_method_are_errors():
    with pytest.raises(ConfigError, match="optim.base_lr"):
        load_pretrain_config([RECIPE], ["optim.base_lr=fast"])
    with pytest.raises(ConfigError, match="simsiam"):
        load_pretrain_config([RECIPE], ["method.name=simsaim"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_pretrain_config([RECIPE], ["optim.base_lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_pretrain_config(["nowhere.yaml"])


def test_hash_ignores_run_name_but_not_hyperparameters():
    base = load_pretrain_config([RECIPE])
    renamed = load_pretrain_config([RECIPE], ["run.name=other", "run.output_dir=/elsewhere"])
    changed = load_pretrain_config([RECIPE], ["optim.base_lr=0.07"])
    assert config_hash(base) == config_hash(renamed)
    assert config_hash(base) != config_hash(changed)
