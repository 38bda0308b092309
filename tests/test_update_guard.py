"""Losses are read only at the logging cadence, and still no update follows a non-finite loss.

The loop reads losses every `output.log_every_n_steps` steps; the update guard (fit.update_guard) holds the
adapters from the first non-finite loss on without reading anything. These tests run the real loop with a NaN at
step 4 of 10 and a reading only at step 10: the LoRA it saves must be exactly the one a 3-step run ends with.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_cli, write_yaml

from lora_trainer.export.lora_file import read_lora_file
from lora_trainer.fit.update_guard import UpdateGuard


def _nan_at_call(monkeypatch, call: int) -> None:
    import lora_trainer.fit.loop as loop

    real_step, calls = loop.training_step, []

    def exploding_step(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if len(calls) == call else loss

    monkeypatch.setattr(loop, "training_step", exploding_step)


@pytest.mark.parametrize(
    "optimizer, mode",
    [("adamw", "found_inf"), ("lion", "wait"), ("adamwschedulefree", "wait")],
)
def test_a_nan_read_late_still_saves_exactly_the_last_good_step(raw_config, tmp_path, capsys, monkeypatch, optimizer, mode):
    raw_config["training"]["optimizer"] = optimizer
    reference = copy.deepcopy(raw_config)
    reference["output"].update(dir=str(tmp_path / "reference"), log_every_n_steps=1)  # read every step
    assert run_cli(["train", write_yaml(tmp_path / "reference.yaml", reference)], capsys)[0] == 0

    raw_config["training"]["max_steps"] = 10
    raw_config["output"]["log_every_n_steps"] = 10  # the NaN of step 4 is read after step 10
    _nan_at_call(monkeypatch, 4)
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 1
    assert "loss became nan at step 4 (epoch 1); saved the LoRA of step 3, the last good one" in err
    held = read_lora_file(tmp_path / "out" / "test_lora-step000003.safetensors")
    good = read_lora_file(tmp_path / "reference" / "test_lora.safetensors")
    assert held.weights.keys() == good.weights.keys()
    # Exact, but for schedule-free: the reference's end of epoch switches its weights y -> x -> y -> x (to evaluate,
    # then to save) where the stopped run switches once, and each switch is a lerp that rounds.
    tolerance = 1e-10 if mode == "wait" else 0.0
    for key, weights in good.weights.items():
        assert weights.tensors.keys() == held.weights[key].tensors.keys()
        for name, tensor in weights.tensors.items():
            assert torch.allclose(held.weights[key].tensors[name], tensor, rtol=0, atol=tolerance), (key, name)
    losses, reference_losses = (
        json.loads((tmp_path / folder / "test_lora-history.json").read_text())["train_losses"] for folder in ("out", "reference")
    )
    assert losses == reference_losses and len(losses) == 3  # logged alike whether read every step or after ten




@pytest.mark.parametrize("fused", [True, False])
def test_the_guard_holds_the_weights_after_a_non_finite_loss_and_only_then(fused):
    layer = torch.nn.Linear(3, 2)
    parameters = list(layer.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=0.1, fused=fused)
    guard = UpdateGuard(optimizer, torch.device("cpu"), loss_scaling=False)
    assert guard.mode == ("found_inf" if fused else "wait")
    for value, moves in ((1.0, True), (float("nan"), False), (1.0, False)):  # tripped once, held for good
        before = [parameter.detach().clone() for parameter in parameters]
        loss = layer(torch.ones(1, 3)).sum() * value
        guard.observe(loss)
        loss.backward()
        guard.step(optimizer, sync_gradients=True)
        optimizer.zero_grad(set_to_none=True)
        changed = any(not torch.equal(old, new) for old, new in zip(before, parameters))
        assert changed == moves and all(torch.isfinite(parameter).all() for parameter in parameters)


def test_with_loss_scaling_a_tripped_guard_makes_the_scaler_skip():
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    guard = UpdateGuard(optimizer, torch.device("cpu"), loss_scaling=True)
    assert guard.mode == "scaled"
    guard.observe(torch.tensor(float("inf")))  # an earlier step's loss
    before = layer.weight.detach().clone()
    loss = layer(torch.ones(1, 3)).sum()  # finite itself: the flag alone holds the update
    scaler.scale(guard.loss_for_backward(loss)).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(layer.weight, before) and scaler.get_scale() < 4.0
