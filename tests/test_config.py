"""Run configs: JSON round trips and overrides of nested fields."""

from __future__ import annotations

import json

from lopt.config import RunConfig, get_config


def test_a_config_round_trips_through_json():
    for budget in ("tiny", "default", "full"):
        config = get_config(budget)
        assert RunConfig.from_json(json.loads(config.dumps())) == config


def test_overriding_one_nested_field_keeps_the_enclosing_configs_defaults():
    default = get_config("default")
    changed = get_config(
        "default", {"meta_train": {"family": {"classes_per_task": 3}, "l3rs": {"control_interval": 8}}}
    )
    assert changed.meta_train.family.classes_per_task == 3
    assert changed.meta_train.family.datasets == default.meta_train.family.datasets
    assert changed.meta_train.family.train_per_class == default.meta_train.family.train_per_class
    assert changed.meta_train.l3rs.control_interval == 8
    assert changed.meta_train.l3rs.normalization == default.meta_train.l3rs.normalization
    assert changed.meta_train.l3rs.base_learning_rate == default.meta_train.l3rs.base_learning_rate
