"""The quickstart's LoRA teaches builtin:shapes-sdxl a new concept, and leaves what it knew.

Scored with the example base's protocol (scripts/evaluate_shapes.py: Euler, 25 steps, CFG 4, seeds
0-15, 64 px) by the shapes classifier, which tests/test_shapes_classifier.py checks on clean renders.
The trigger "zqx" must bring cyan, a colour the base never saw, and the 12 prompts it was pretrained
on must keep their score.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

pytestmark = pytest.mark.learning

QUICKSTART_MODEL = "builtin:shapes-sdxl"


@pytest.fixture(scope="module")
def evaluation():
    import evaluate_shapes

    return evaluate_shapes


@pytest.fixture(scope="module")
def pipelines(quickstart_run, evaluation):
    out, result = quickstart_run
    assert result.returncode == 0, result.stderr[-3000:]
    torch.set_flush_denormal(True)
    base = evaluation.load_pipeline(QUICKSTART_MODEL)
    tuned = evaluation.load_pipeline(QUICKSTART_MODEL, [(out / "quickstart.safetensors", 1.0)])
    return base, tuned


def test_quickstart_trains_on_the_pretrained_shapes_base():
    import yaml

    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    assert config["model"]["pretrained"] == QUICKSTART_MODEL


def test_the_trigger_brings_the_new_colour_only_with_the_lora(pipelines, evaluation):
    base, tuned = pipelines
    with_lora = evaluation.trigger_cyan_shares(tuned)
    without_lora = evaluation.trigger_cyan_shares(base)
    print(f"cyan with the LoRA {with_lora}, without {without_lora}")
    assert sum(with_lora) / len(with_lora) >= 0.80
    assert sum(without_lora) / len(without_lora) <= 0.20


def test_the_old_prompts_keep_their_score(pipelines, evaluation):
    base, tuned = pipelines
    before = evaluation.old_prompt_scores(base)
    after = evaluation.old_prompt_scores(tuned)
    mean_before, mean_after = sum(before.values()) / len(before), sum(after.values()) / len(after)
    print(f"old prompts: {mean_before:.1%} without the LoRA, {mean_after:.1%} with it")
    assert mean_after >= mean_before - 0.10
