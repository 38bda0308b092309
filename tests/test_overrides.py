from __future__ import annotations

import pytest

from lora_trainer.config.overrides import apply_overrides, parse_override
from lora_trainer.errors import ConfigError


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("network.rank=16", ["network", "rank"], 16),
        ("training.learning_rate=1e-4", ["training", "learning_rate"], 1e-4),
        ("training.gradient_checkpointing=true", ["training", "gradient_checkpointing"], True),
        ("training.betas=[0.9, 0.99]", ["training", "betas"], [0.9, 0.99]),
        ("model.vae=null", ["model", "vae"], None),
        ("output.name=my lora: v2", ["output", "name"], "my lora: v2"),
        ("datasets.0.path=/data/x", ["datasets", "0", "path"], "/data/x"),
    ],
)
def test_values_are_parsed_as_yaml(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_set_nested_fields_and_list_entries_without_touching_the_input():
    raw = {"datasets": [{"path": "a"}, {"path": "b"}], "network": None}
    result = apply_overrides(raw, ["datasets.1.repeats=5", "network.rank=8", "training.seed=3"])
    assert result == {
        "datasets": [{"path": "a"}, {"path": "b", "repeats": 5}],
        "network": {"rank": 8},
        "training": {"seed": 3},
    }
    assert raw == {"datasets": [{"path": "a"}, {"path": "b"}], "network": None}


@pytest.mark.parametrize(
    "override, message",
    [
        ("network", "expected section.field=value"),
        ("=3", "expected section.field=value"),
        ("network..rank=3", "empty name"),
        ("datasets.2.repeats=5", "datasets has 1 entry, so the index must be 0..0"),
        ("datasets.first.repeats=5", "datasets.first must be a list index"),
        ("network.rank.low=1", "network.rank is a single value"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        apply_overrides({"datasets": [{"path": "a"}], "network": {"rank": 4}}, [override])
