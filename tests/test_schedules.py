"""Learning-rate schedules against their formulas, through a real optimizer and a saved state, and the training
plan's numbers against hand computation."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import MIXED_SHAPES
from pydantic import ValidationError

from lora_trainer.config.load import parse_config
from lora_trainer.config.training import TrainingConfig
from lora_trainer.fit.plan import format_plan, training_plan
from lora_trainer.fit.schedules import learning_rate_at, make_lr_scheduler

LR = 1e-3
TOTAL = 20
POLYNOMIAL_END = 1e-7  # diffusers' get_polynomial_decay_schedule_with_warmup: lr_end=1e-7, an absolute rate


def expected_factor(schedule: str, index: int, warmup: int, cycles: int = 1, power: float = 1.0, min_ratio: float = 0.0) -> float:
    """The factor on the learning rate at schedule index `index` (the loop's optimizer step index + 1) of a
    TOTAL-step run: a linear warmup from 0 over `warmup` steps, then the decay over progress p in [0, 1]."""
    if schedule == "constant":
        return 1.0
    if index < warmup:
        return index / warmup
    p = (index - warmup) / (TOTAL - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * p))
    return {
        "constant_with_warmup": 1.0,
        "linear": 1 - p,
        "cosine": min_ratio + (1 - min_ratio) * cosine,
        "cosine_with_restarts": 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1))),
        # from the peak LR down to POLYNOMIAL_END, relative to the optimizer's default rate (LR here)
        "polynomial": ((LR - POLYNOMIAL_END) * (1 - p) ** power + POLYNOMIAL_END) / LR,
    }[schedule]


# (config fields, warmup steps they resolve to over TOTAL steps, options of expected_factor)
CASES = [
    ({"lr_scheduler": "constant"}, 0, {}),
    ({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 4}, 4, {}),
    ({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 0.25}, 5, {}),  # 0.25 x 20
    ({"lr_scheduler": "linear", "lr_warmup_steps": 3}, 3, {}),
    ({"lr_scheduler": "linear", "lr_warmup_steps": 0.1}, 2, {}),
    ({"lr_scheduler": "cosine", "lr_warmup_steps": 2}, 2, {}),
    ({"lr_scheduler": "cosine", "lr_warmup_steps": 0.15, "lr_scheduler_min_lr_ratio": 0.1}, 3, {"min_ratio": 0.1}),  # 3.0000000000000004
    ({"lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 2, "lr_scheduler_num_cycles": 3}, 2, {"cycles": 3}),
    ({"lr_scheduler": "polynomial", "lr_warmup_steps": 3}, 3, {}),
    ({"lr_scheduler": "polynomial", "lr_warmup_steps": 0.2, "lr_scheduler_power": 2.0}, 4, {"power": 2.0}),
]


CASE_IDS = ["-".join(str(value) for value in fields.values()) for fields, _, _ in CASES]


def _scheduled_run(config: TrainingConfig, steps: int, restore_at: int | None = None) -> list[float]:
    """The learning rate of each optimizer step of a real AdamW run; with `restore_at`, after that many steps the
    optimizer and the schedule (through JSON, as fit/state.py saves it) go into fresh ones, as a resume does."""
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([parameter], lr=config.learning_rate)
    scheduler = make_lr_scheduler(optimizer, config, TOTAL)
    rates = []
    for step in range(steps):
        if step == restore_at:
            optimizer_state, schedule_state = optimizer.state_dict(), json.loads(json.dumps(scheduler.state_dict()))
            optimizer = torch.optim.AdamW([parameter], lr=config.learning_rate)
            scheduler = make_lr_scheduler(optimizer, config, TOTAL)
            optimizer.load_state_dict(optimizer_state)
            scheduler.load_state_dict(schedule_state)
        rates.append(optimizer.param_groups[0]["lr"])
        parameter.grad = torch.ones_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return rates


@pytest.mark.parametrize("fields, warmup, options", CASES, ids=CASE_IDS)
def test_each_schedule_follows_its_formula(fields, warmup, options):
    config = TrainingConfig(learning_rate=LR, **fields)
    expected = [LR * expected_factor(config.lr_scheduler, index, warmup, **options) for index in range(TOTAL)]
    assert _scheduled_run(config, TOTAL) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    # learning_rate_at counts steps from 1, as the loop does: step s trains at schedule index s - 1
    assert [learning_rate_at(config, TOTAL, step) for step in range(1, TOTAL + 1)] == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("fields, warmup, options", CASES, ids=CASE_IDS)
def test_a_restored_schedule_continues_where_it_stopped(fields, warmup, options):
    config = TrainingConfig(learning_rate=LR, **fields)
    assert _scheduled_run(config, TOTAL, restore_at=7) == _scheduled_run(config, TOTAL)


def test_polynomial_needs_a_rate_above_its_end_rate():
    with pytest.raises(ValidationError, match="learning_rate: polynomial decays to diffusers' fixed end rate 1e-07"):
        TrainingConfig(lr_scheduler="polynomial", learning_rate=1e-7)


def test_options_at_their_defaults_are_accepted_with_any_schedule():
    # a resolved config (dump_config) names every option; it must load back whatever its schedule
    config = TrainingConfig(lr_scheduler="linear", lr_scheduler_num_cycles=1, lr_scheduler_power=1.0, lr_scheduler_min_lr_ratio=0.0)
    assert config.lr_scheduler == "linear"


def test_a_whole_float_warmup_is_a_step_count():
    assert TrainingConfig(lr_scheduler="linear", lr_warmup_steps=10.0).lr_warmup_steps == 10
    assert isinstance(TrainingConfig(lr_scheduler="linear", lr_warmup_steps=10.0).lr_warmup_steps, int)


def test_adafactor_in_relative_step_mode_reports_its_own_rate():
    from transformers.optimization import Adafactor, AdafactorSchedule

    torch.manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(8, 8))
    optimizer = Adafactor([parameter], lr=None, relative_step=True)
    scheduler = make_lr_scheduler(optimizer, TrainingConfig(lr_scheduler="cosine", lr_warmup_steps=2), total_steps=10)
    assert isinstance(scheduler, AdafactorSchedule)
    for step in range(1, 4):
        rms = parameter.detach().pow(2).mean().sqrt().item()  # Adafactor scales its step by the weights' RMS before it
        parameter.grad = torch.randn_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as the loop does, before it steps the schedule
        scheduler.step()
        # Shazeer & Stern 2018: relative step min(1e-2, 1/sqrt(step)) times max(eps2 = 1e-3, RMS(weights))
        assert scheduler.get_last_lr()[0] == pytest.approx(min(1e-2, 1 / math.sqrt(step)) * max(1e-3, rms), rel=1e-5)
    json.dumps(scheduler.state_dict())  # a saved state holds it as JSON


# The plan ------------------------------------------------------------------------------------------------


def plan_config(tmp_path, **training):
    """12 images x 2 repeats, batch 2 per device, 2 batches accumulated, the UNet at 1e-4 and the text encoders at 5e-5."""
    training = {"batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-4, "epochs": 3, **training}
    return parse_config({
        "model": {"pretrained": "builtin:tiny-sdxl"},
        "datasets": [{"path": str(MIXED_SHAPES), "repeats": 2}],
        "network": {"text_encoder_learning_rate": 5e-5},
        "training": training,
        "output": {"dir": str(tmp_path)},
    })


# 24 items on 2 processes of batch 2: global batch 4. Say the buckets hold 14 and 10 of the 24: 4 + 3 = 7
# batches (24 / 4 would give 6); 2 accumulated: ceil(7 / 2) = 4 steps per epoch.
IMAGES, BATCHES, PROCESSES = 24, 7, 2


def plan_rows(text: str) -> dict[str, str]:
    """The plan's `label  value` lines by label, checking that it is one block with the values in one column."""
    lines = text.splitlines()
    assert lines[0] == "training plan:"
    matches = [re.fullmatch(r"  (\S.*?\S)  +(\S.*)", line) for line in lines[1:]]
    assert all(matches), text
    assert len({match.start(2) for match in matches}) == 1, f"values not aligned:\n{text}"
    return {match.group(1): match.group(2) for match in matches}


def test_the_plan_counts_steps_and_rates_as_by_hand(tmp_path):
    plan = training_plan(plan_config(tmp_path, lr_scheduler="cosine", lr_warmup_steps=0.25), IMAGES, BATCHES, PROCESSES)
    assert (plan.global_batch, plan.images_per_step, plan.steps_per_epoch) == (4, 8, 4)
    assert (plan.total_steps, plan.epochs, plan.warmup_steps) == (12, 3, 3)  # 3 epochs x 4; int(0.25 x 12)
    last = 0.5 * (1 + math.cos(math.pi * (11 - 3) / (12 - 3)))  # step 12 trains at index 11
    assert set(plan.learning_rates) == {"unet", "text_encoder_1", "text_encoder_2"}
    for part, rate in (("unet", 1e-4), ("text_encoder_1", 5e-5), ("text_encoder_2", 5e-5)):
        rates = plan.learning_rates[part]
        assert (rates.first, rates.peak) == (0.0, pytest.approx(rate))
        assert rates.last == pytest.approx(rate * last)

    rows = plan_rows(format_plan(plan))
    assert rows == {
        "images x repeats": "24 per epoch",
        "global batch": "4 = 2 per device x 2 processes",
        "accumulation": "2 batches per optimizer step: 2 per device x 2 processes x 2 accumulated = 8 images per step",
        "batches per epoch": "7: each aspect-ratio bucket's images in batches of 4, its last batch rounded up (24 / 4 alone would give 6)",
        "steps per epoch": "4 = 7 batches / 2 accumulated, rounded up",
        "total steps": "12 = 3 epochs x 4 steps",
        "lr schedule": "cosine, 3 warmup steps (0.25 of 12, rounded down)",
        "lr unet": f"first 0.00e+00, peak 1.00e-04, last {1e-4 * last:.2e}",
        "lr text_encoder_1": f"first 0.00e+00, peak 5.00e-05, last {5e-5 * last:.2e}",
        "lr text_encoder_2": f"first 0.00e+00, peak 5.00e-05, last {5e-5 * last:.2e}",
    }


def test_a_plan_from_max_steps(tmp_path):
    plan = training_plan(plan_config(tmp_path, max_steps=10, lr_scheduler="linear", lr_warmup_steps=2), IMAGES, 6, PROCESSES)
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs) == (3, 10, 4)  # ceil(6 / 2); ceil(10 / 3)
    rows = plan_rows(format_plan(plan))
    assert rows["batches per epoch"] == "6 = 24 / 4" and rows["steps per epoch"] == "3 = 6 batches / 2 accumulated"
    assert rows["total steps"] == "10 (training.max_steps): 4 epochs, the last one cut short"
    assert rows["lr schedule"] == "linear, 2 warmup steps"
    unet = plan.learning_rates["unet"]
    assert (unet.first, unet.peak, unet.last) == (0.0, pytest.approx(1e-4), pytest.approx(1e-4 * (10 - 9) / (10 - 2)))


def test_the_plan_leaves_adafactors_own_rate_to_it(tmp_path):
    config = plan_config(tmp_path)
    # optimizer_args comes with the optimizer choices; copied in here so this runs whichever lands first
    training = config.training.model_copy(update={"optimizer": "adafactor", "optimizer_args": {"relative_step": True}})
    plan = training_plan(config.model_copy(update={"training": training}), IMAGES, BATCHES, PROCESSES)
    assert plan.adafactor_sets_rates and plan.learning_rates == {}
    rows = plan_rows(format_plan(plan))
    assert rows["lr schedule"].startswith("set by Adafactor") and rows["lr unet"].startswith("set by Adafactor")
