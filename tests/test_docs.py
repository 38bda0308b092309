"""The docs stay true: the config reference is generated from the code, README and CI agree."""

from __future__ import annotations

from conftest import REPO

from lora_trainer.config.reference import render


def test_config_reference_is_up_to_date():
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == render(), "regenerate: python -m lora_trainer.config.reference > docs/config.md"


def test_every_config_field_is_documented():
    from lora_trainer.config.sample_command import SampleCommand
    from lora_trainer.config.schema import Config

    for section in Config.model_fields.values():
        assert section.description
    sections = [SampleCommand]  # the sample command's own options, whose docstrings are their --help
    for name in ("ModelConfig", "DatasetConfig", "DataConfig", "NetworkConfig", "TrainingConfig", "ObjectiveConfig", "OutputConfig",
                 "SampleConfig", "ValidationConfig"):
        sections.append(getattr(__import__("lora_trainer.config.schema", fromlist=[name]), name))
    from lora_trainer.config.ema import EmaConfig

    sections.append(EmaConfig)
    for model in sections:
        name = model.__name__
        missing = [field for field, info in model.model_fields.items() if not info.description]
        assert not missing, f"{name} fields without a docstring: {missing}"


def test_readme_opens_with_the_quickstart_and_the_test_command_that_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    blocks = readme.split("```")
    commands = [block for block in blocks[1::2]]
    assert "lora-train train configs/quickstart.yaml" in commands[0]
    assert "pip install torch==2.13.0" in commands[0] and "pip install torch==2.13.0" in commands[1]
    test_command = commands[1].strip().removeprefix("bash").strip()
    assert "pytest" in test_command
    assert test_command in ci.splitlines(), ".ci/run must run the README's test command, unchanged"
