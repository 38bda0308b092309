"""The EMA of the adapters (`training.ema`): its update against the formula, the swap in and out, and a real run
whose saved LoRA, validation and training state are the average's."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_in_process
from safetensors.torch import load_file

from lora_trainer.adapters.attach import attach_lora
from lora_trainer.adapters.model_weights import read_lora_weights
from lora_trainer.config.ema import EmaConfig
from lora_trainer.export.lora_file import to_kohya_tensors
from lora_trainer.fit.ema import AdapterEMA
from lora_trainer.fit.state import adapter_tensors, saved_states


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)
        self.other = torch.nn.Linear(5, 3)


def tiny_adapted() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    model = Tiny()
    attach_lora(model, ("proj", "other"), rank=2, alpha=2)
    return {"unet": model}


def lora_values(trained: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in adapter_tensors(trained).items()}


def set_random_weights(trained: dict[str, torch.nn.Module]) -> None:
    with torch.no_grad():
        for model in trained.values():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn_like(parameter))


def expected_average(history: list[dict[str, torch.Tensor]], start: dict[str, torch.Tensor], decay: float, warmup: bool):
    """The EMA after updates at the weights in `history`, written out: the first warm-up update copies, the one after
    n others uses min(decay, (1 + n) / (10 + n)); without warm-up, `decay` throughout."""
    average = {key: value.double() for key, value in start.items()}
    for n, weights in enumerate(history):
        d = (0.0 if n == 0 else min(decay, (1 + n) / (10 + n))) if warmup else decay
        average = {key: d * average[key] + (1 - d) * weights[key].double() for key in average}
    return average


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key].double(), expected[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("warmup, every", [(True, 1), (True, 2), (False, 3)])
def test_the_update_is_the_moving_average_of_the_weights_at_each_update(warmup, every):
    trained = tiny_adapted()
    start = lora_values(trained)
    ema = AdapterEMA(trained, EmaConfig(enabled=True, decay=0.3, warmup=warmup, update_every_n_steps=every))
    history = []
    for step in range(1, 11):
        set_random_weights(trained)
        ema.update(step)
        if step % every == 0:
            history.append(lora_values(trained))
    # decay 0.3 caps the warm-up from the fourth update on: 4/13 > 0.3
    assert ema.state_values() == {"updates": 10 // every} and len(history) == 10 // every
    assert_close(ema.state_tensors(), expected_average(history, start, 0.3, warmup))


def test_the_average_swaps_in_and_the_live_weights_come_back_exactly_even_after_an_error():
    trained = tiny_adapted()
    ema = AdapterEMA(trained, EmaConfig(enabled=True, decay=0.5, on_cpu=True))
    for step in (1, 2, 3):
        set_random_weights(trained)
        ema.update(step)
    set_random_weights(trained)
    live = lora_values(trained)
    average = ema.state_tensors()
    with pytest.raises(RuntimeError, match="inside"):
        with ema.swapped_in():
            inside = lora_values(trained)
            raise RuntimeError("inside")
    assert all(torch.equal(inside[key], average[key]) for key in average)
    assert not torch.equal(inside["unet/proj.lora_A.default.weight"], live["unet/proj.lora_A.default.weight"])
    after = lora_values(trained)
    assert all(torch.equal(after[key], live[key]) for key in live)


def exported(run) -> dict[str, torch.Tensor]:
    """The run's adapters as they hold now, through the export path `save_lora` takes (fp32, as the test saves)."""
    models = {part: run.accelerator.unwrap_model(model) for part, model in run.trained.items()}
    tensors = to_kohya_tensors({part: (model, read_lora_weights(model)) for part, model in models.items()}, torch.float32)
    return {key: value.clone() for key, value in tensors.items()}


def test_a_run_saves_validates_and_resumes_with_the_average(raw_config, monkeypatch):
    from accelerate.state import AcceleratorState, GradientState

    import lora_trainer.fit.evaluate as evaluate
    import lora_trainer.fit.loop as loop
    from lora_trainer.config.load import parse_config
    from lora_trainer.fit.save import finalize
    from lora_trainer.fit.setup import setup

    raw_config["training"]["ema"] = {"enabled": True, "decay": 0.9}
    raw_config["validation"] = {"fraction": 0.2, "timesteps": [500]}
    raw_config["output"]["save_state_every_n_steps"] = 2
    live_after_step, held_while_validating = [], []
    real_finish, real_validation = loop._finish_step, evaluate.Evaluator._measure_validation

    def record_live_weights(run, *args):  # right after each optimizer step
        live_after_step.append(lora_values({part: run.accelerator.unwrap_model(model) for part, model in run.trained.items()}))
        real_finish(run, *args)

    def record_validated_weights(evaluator, *args):
        held_while_validating.append(lora_values({part: evaluator.accelerator.unwrap_model(model) for part, model in evaluator.trained.items()}))
        real_validation(evaluator, *args)

    monkeypatch.setattr(loop, "_finish_step", record_live_weights)
    monkeypatch.setattr(evaluate.Evaluator, "_measure_validation", record_validated_weights)
    run, path = train_in_process(raw_config)

    names = run.ema.names
    start = {key: value for key, value in live_after_step[0].items() if key in names}  # the first update copies anyway
    average = run.ema.state_tensors()
    assert_close(average, expected_average([{key: w[key] for key in names} for w in live_after_step], start, 0.9, True))
    assert all(torch.equal(held_while_validating[-1][key], average[key]) for key in names)  # the last validation: the average
    saved = load_file(path)
    live = exported(run)
    with run.ema.swapped_in():
        from_average = exported(run)
    assert saved.keys() == from_average.keys() and all(torch.equal(saved[key], from_average[key]) for key in saved)
    assert any(not torch.equal(saved[key], live[key]) for key in saved if "lora_up" in key)

    state = saved_states(run.config.output)[0]
    assert state.name == "test_lora-step000002" and json.loads((state / "state.json").read_text())["ema"] == {"updates": 2}
    assert_close(load_file(state / "ema.safetensors"), expected_average([{key: w[key] for key in names} for w in live_after_step[:2]], start, 0.9, True))

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = setup(parse_config(raw_config), resume=str(state))
    assert resumed.ema.state_values() == {"updates": 2}
    try:
        loop.fit(resumed)
        resumed_path = finalize(resumed)
    finally:
        resumed.accelerator.end_training()
    again = resumed.ema.state_tensors()
    assert all(torch.equal(again[key], average[key]) for key in average)
    resaved = load_file(resumed_path)
    assert all(torch.equal(resaved[key], saved[key]) for key in saved)
