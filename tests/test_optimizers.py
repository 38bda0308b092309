"""The optimizers of `training.optimizer`: the argument table against the real classes, what each does to a small
module, the config errors, the bitsandbytes backend check, schedule-free's modes and the training-state round trip."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import sys
import typing

import pytest
import torch
from conftest import small_raw_config, train_in_process
from pydantic import ValidationError
from safetensors.torch import save

from lora_trainer.config.backends import bitsandbytes_problem
from lora_trainer.config.load import dump_config, parse_config
from lora_trainer.config.optimizers import OPTIMIZERS, Numbers, optimizer_options, uses_own_learning_rate
from lora_trainer.config.training import TrainingConfig
from lora_trainer.errors import ConfigError, UserError
from lora_trainer.fit.optim import (
    log_optimizer_notes,
    make_optimizer,
    optimizer_in_eval_mode,
    optimizer_train_mode,
)
from lora_trainer.fit.state import SavedState, _split_optimizer_state, load_optimizer_state

# bitsandbytes' paged optimizer says once that it runs unpaged on a CPU; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

NAMES = list(OPTIMIZERS)
# Prodigy wants a learning rate of about 1.0 (its own estimate scales it); the others a usual one.
LEARNING_RATES = {"prodigy": 1.0, "sgdnesterov": 5e-2}


@pytest.fixture(autouse=True)
def one_thread():
    """The small modules here (and the tiny model) gain little from a thread pool, which on a busy machine spins
    for most of the time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _class_of(name: str) -> type:
    module, _, class_name = OPTIMIZERS[name].implementation.rpartition(".")
    return getattr(importlib.import_module(module), class_name)


def _config(name: str, **fields) -> TrainingConfig:
    return TrainingConfig(optimizer=name, learning_rate=LEARNING_RATES.get(name, 1e-2), **fields)


def _problem(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        TrainingConfig(**fields)
    return str(caught.value)


# The table against the real classes ---------------------------------------------------------------------------


def test_the_field_offers_exactly_the_table():
    assert set(typing.get_args(TrainingConfig.model_fields["optimizer"].annotation)) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", NAMES)
def test_the_table_matches_the_real_signature(name):
    parameters = inspect.signature(_class_of(name)).parameters
    spec = OPTIMIZERS[name]
    for argument, declared in spec.args.items():
        assert argument in parameters, f"{name} has no argument {argument}"
        default = parameters[argument].default
        if default is None:  # e.g. Adafactor's beta1: off unless given, so any value of the declared type
            continue
        if isinstance(declared, Numbers):
            assert isinstance(default, tuple) and len(default) == declared.count, (argument, default)
        elif declared is float:
            assert isinstance(default, (int, float)) and not isinstance(default, bool), (argument, default)
        else:
            assert type(default) is declared, (argument, default)
    set_by_us = {"lr", *spec.shortcuts, *spec.preset, *optimizer_options(_config(name))}
    assert set_by_us <= set(parameters), set_by_us - set(parameters)


@pytest.mark.parametrize("name", NAMES)
def test_the_adam_shortcuts_feed_exactly_the_optimizers_with_adams_two_betas_and_epsilon(name):
    parameters = inspect.signature(_class_of(name)).parameters
    betas, eps = parameters.get("betas"), parameters.get("eps")
    adam_like = (
        betas is not None and isinstance(betas.default, tuple) and len(betas.default) == 2
        and eps is not None and isinstance(eps.default, float)
    )
    assert ("betas" in OPTIMIZERS[name].shortcuts) == adam_like
    assert ("eps" in OPTIMIZERS[name].shortcuts) == adam_like
    assert "weight_decay" in parameters and "weight_decay" in OPTIMIZERS[name].shortcuts


# Stepping a small module ---------------------------------------------------------------------------------------


def _two_layers(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))  # 4096 weights: bnb's 8-bit size


def _groups(model: torch.nn.Module, rates: tuple[float, float]) -> list[dict]:
    return [{"name": f"part{index}", "params": list(layer.parameters()), "lr": rate} for index, (layer, rate) in enumerate(zip(model, rates))]


def _loss(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(32, 64, generator=generator), torch.randn(32, 64, generator=generator)
    return ((model(inputs) - targets) ** 2).mean()


def _train(model: torch.nn.Module, optimizer, steps: int) -> list[float]:
    optimizer_train_mode(optimizer)
    losses = []
    for _ in range(steps):
        loss = _loss(model)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_lowers_the_loss_over_two_groups(name):
    model = _two_layers()
    config = _config(name)
    second_rate = config.learning_rate if name == "prodigy" else config.learning_rate / 2  # prodigy: one rate
    optimizer = make_optimizer(_groups(model, (config.learning_rate, second_rate)), config)
    assert isinstance(optimizer, _class_of(name))
    losses = _train(model, optimizer, 15)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", [name for name in NAMES if name != "prodigy"])
def test_each_group_steps_by_its_own_learning_rate(name):
    """Two copies of one weight with the same gradient, one at 10x the other's rate: the first step is 10x longer
    (every update here is linear in the rate at the first step)."""
    torch.manual_seed(0)
    start, gradient = torch.randn(64, 64), torch.randn(64, 64)
    fast, slow = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    config = _config(name, weight_decay=0.0)
    optimizer = make_optimizer([{"name": "fast", "params": [fast], "lr": 1e-2}, {"name": "slow", "params": [slow], "lr": 1e-3}], config)
    optimizer_train_mode(optimizer)
    fast.grad, slow.grad = gradient.clone(), gradient.clone()
    optimizer.step()
    ratio = (fast.detach() - start).norm() / (slow.detach() - start).norm()
    assert ratio == pytest.approx(10.0, rel=2e-3)


def _first_step(name: str, gradient: torch.Tensor, **fields) -> torch.Tensor:
    parameter = torch.nn.Parameter(torch.zeros_like(gradient))
    config = TrainingConfig(optimizer=name, learning_rate=3e-3, weight_decay=0.0, **fields)
    optimizer = make_optimizer([{"name": "unet", "params": [parameter], "lr": 3e-3}], config)
    parameter.grad = gradient
    optimizer.step()
    return parameter.detach()


def test_first_steps_follow_each_optimizers_formula():
    gradient = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    lr = 3e-3
    # AdamW's bias-corrected first moments are g and g^2 (Loshchilov & Hutter 2019): -lr g / (|g| + eps).
    torch.testing.assert_close(_first_step("adamw", gradient), -lr * gradient / (gradient.abs() + 1e-8))
    # Lion (Chen et al. 2023): -lr sign(beta1 m + (1 - beta1) g), with m = 0.
    torch.testing.assert_close(_first_step("lion", gradient), -lr * gradient.sign())
    # Nesterov SGD, momentum 0.9: the buffer is g, the step g + 0.9 g.
    torch.testing.assert_close(_first_step("sgdnesterov", gradient), -lr * 1.9 * gradient)


def test_adafactor_uses_the_configured_rate_by_default_and_its_own_in_relative_step_mode():
    ones = torch.ones(8, 16)  # second moment 1 everywhere, so the unclipped update is the gradient itself
    assert not uses_own_learning_rate(TrainingConfig(optimizer="adafactor"))
    torch.testing.assert_close(_first_step("adafactor", ones), torch.full_like(ones, -3e-3))
    relative = {"optimizer_args": {"relative_step": True}}
    assert uses_own_learning_rate(TrainingConfig(optimizer="adafactor", **relative))
    # Relative step size min(1e-2, 1 / sqrt(t)) at t = 1 (Shazeer & Stern 2018, section 8), whatever the config says.
    torch.testing.assert_close(_first_step("adafactor", ones, **relative), torch.full_like(ones, -1e-2))


def test_adafactor_relative_step_says_once_that_it_sets_its_own_rate(caplog):
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        log_optimizer_notes(TrainingConfig(optimizer="adafactor", optimizer_args={"relative_step": True}))
    lines = [record for record in caplog.records if "adafactor" in record.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "training.learning_rate, lr_scheduler and the per-part learning rates are ignored" in lines[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        log_optimizer_notes(TrainingConfig(optimizer="adafactor"))
    assert not caplog.records


@pytest.mark.parametrize("learning_rate, warned", [(1e-4, True), (1.0, False)])
def test_prodigy_warns_about_a_small_learning_rate(caplog, learning_rate, warned):
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        log_optimizer_notes(TrainingConfig(optimizer="prodigy", learning_rate=learning_rate))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert bool(warnings) == warned
    if warned:
        assert "prodigy" in warnings[0] and "expects about 1.0" in warnings[0]


def test_prodigy_refuses_groups_with_different_rates_before_any_step():
    model = _two_layers()
    with pytest.raises(UserError, match="training.optimizer: prodigy takes one learning rate .* part0 1, part1 0.5"):
        make_optimizer(_groups(model, (1.0, 0.5)), TrainingConfig(optimizer="prodigy", learning_rate=1.0))


def test_an_argument_out_of_the_optimizers_range_is_a_user_error():
    config = TrainingConfig(optimizer="sgdnesterov", optimizer_args={"momentum": 0})
    with pytest.raises(UserError, match="training.optimizer_args: sgdnesterov refused its arguments .*Nesterov"):
        make_optimizer(_groups(_two_layers(), (1e-2, 1e-2)), config)


def test_optimizer_args_reach_the_optimizer():
    config = TrainingConfig(optimizer="came", optimizer_args={"betas": [0.8, 0.9, 0.99], "ams_bound": True})
    group = make_optimizer(_groups(_two_layers(), (1e-3, 1e-3)), config).param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.9, 0.99) and group["ams_bound"] is True
    momentum = make_optimizer(_groups(_two_layers(), (1e-3, 1e-3)), TrainingConfig(optimizer="sgdnesterov")).param_groups[0]
    assert momentum["momentum"] == 0.9 and momentum["nesterov"] is True


# Schedule-free's two modes -------------------------------------------------------------------------------------


def test_schedule_free_eval_mode_holds_the_averaged_weights_and_gives_them_back():
    model = _two_layers()
    config = _config("adamwschedulefree")
    optimizer = make_optimizer(_groups(model, (1e-2, 1e-2)), config)
    _train(model, optimizer, 5)
    beta1 = config.adam_betas[0]
    training_weights = [p.detach().clone() for p in model.parameters()]
    # y = (1 - beta1) z + beta1 x (Defazio et al. 2024), so the average x = (y - (1 - beta1) z) / beta1.
    averaged = [(y - (1 - beta1) * optimizer.state[p]["z"]) / beta1 for y, p in zip(training_weights, model.parameters())]
    with optimizer_in_eval_mode(optimizer):
        for parameter, expected in zip(model.parameters(), averaged):
            torch.testing.assert_close(parameter.detach(), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(next(model.parameters()), training_weights[0])
    for parameter, expected in zip(model.parameters(), training_weights):
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-5, atol=1e-6)
    _train(model, optimizer, 1)  # it steps again: back in training mode


def test_schedule_free_takes_the_warmup_of_a_config_written_for_adamw_as_its_own():
    from lora_trainer.fit.schedules import make_lr_scheduler

    config = TrainingConfig(optimizer="adamwschedulefree", lr_scheduler="constant_with_warmup", lr_warmup_steps=10)
    optimizer = make_optimizer(_groups(_two_layers(), (1e-3, 1e-3)), config)
    assert all(group["warmup_steps"] == 10 for group in optimizer.param_groups)
    schedule = make_lr_scheduler(optimizer, config, total_steps=100)
    assert [schedule.lr_lambdas[0](index) for index in (0, 5, 99)] == [1.0, 1.0, 1.0]  # no second warmup on top


def test_eval_mode_changes_nothing_for_an_optimizer_without_modes():
    model = _two_layers()
    optimizer = make_optimizer(_groups(model, (1e-2, 1e-2)), _config("adamw"))
    _train(model, optimizer, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with optimizer_in_eval_mode(optimizer):
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# The training state round trip ---------------------------------------------------------------------------------

ROUND_TRIPS = [(name, {}) for name in NAMES] + [("adafactor", {"optimizer_args": {"relative_step": True}})]


def _as_json_types(value):
    """What JSON keeps of a value: tuples become lists (state.json has no tuples)."""
    if isinstance(value, (tuple, list)):
        return [_as_json_types(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_json_types(item) for key, item in value.items()}
    return value


def _assert_same_state(restored, original):
    assert restored.keys() == original.keys()
    for key, value in original.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(restored[key], value) and restored[key].dtype == value.dtype, key
        elif isinstance(value, dict):
            _assert_same_state(restored[key], value)
        else:
            assert _as_json_types(restored[key]) == _as_json_types(value), key


@pytest.mark.parametrize("name, fields", ROUND_TRIPS, ids=[f"{name}{'-relative' if fields else ''}" for name, fields in ROUND_TRIPS])
def test_the_optimizer_state_survives_the_training_state_files(name, fields, tmp_path):
    config = _config(name, **fields)
    rates = (config.learning_rate, config.learning_rate)
    model = _two_layers()
    optimizer = make_optimizer(_groups(model, rates), config)
    _train(model, optimizer, 3)

    tensors, values = _split_optimizer_state(optimizer.state_dict())
    (tmp_path / "optimizer.safetensors").write_bytes(save(tensors))
    saved = SavedState(tmp_path, None, 0, 1, 1, "", "", {"optimizer": json.loads(json.dumps(values))})
    copy = _two_layers(seed=5)
    copy.load_state_dict(model.state_dict())
    restored = make_optimizer(_groups(copy, rates), config)
    load_optimizer_state(restored, saved)

    original_state, restored_state = optimizer.state_dict(), restored.state_dict()
    assert restored_state["state"].keys() == original_state["state"].keys()
    for index, entries in original_state["state"].items():
        _assert_same_state(restored_state["state"][index], entries)
    for restored_group, group in zip(restored_state["param_groups"], original_state["param_groups"]):
        assert _as_json_types(restored_group) == _as_json_types(group)
    _train(model, optimizer, 1)
    _train(copy, restored, 1)
    for parameter, same in zip(model.parameters(), copy.parameters()):
        assert torch.equal(parameter, same)


# Config errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"optimizer": "prodigy", "optimizer_args": {"d_coeff": 2}},
         "optimizer_args.d_coeff: prodigy takes no argument 'd_coeff'; did you mean 'd_coef'? (allowed: beta3, decouple"),
        ({"optimizer": "prodigy", "optimizer_args": {"d_coef": "big"}}, "optimizer_args.d_coef: prodigy's d_coef must be a number, got 'big'"),
        ({"optimizer": "prodigy", "optimizer_args": {"decouple": 1}}, "optimizer_args.decouple: prodigy's decouple must be true or false, got 1"),
        ({"optimizer": "prodigy", "optimizer_args": {"slice_p": 1.5}}, "optimizer_args.slice_p: prodigy's slice_p must be an integer, got 1.5"),
        ({"optimizer": "came", "optimizer_args": {"betas": [0.9, 0.99]}}, "came's betas must be a list of 3 numbers, got [0.9, 0.99]"),
        ({"optimizer_args": {"betas": [0.9, 0.99]}}, "optimizer_args.betas: adamw takes its betas from training.adam_betas; set it there"),
        ({"optimizer": "prodigy", "optimizer_args": {"eps": 1e-6}}, "optimizer_args.eps: prodigy takes its eps from training.adam_epsilon"),
        ({"optimizer": "lion", "optimizer_args": {"weight_decay": 0.1}}, "optimizer_args.weight_decay: lion takes its weight_decay from training.weight_decay"),
        ({"optimizer_args": {"lr": 1e-3}}, "optimizer_args.lr: the learning rate is training.learning_rate"),
        ({"optimizer": "lion", "adam_betas": (0.9, 0.99)}, "adam_betas: only the Adam family (adamw, adamw8bit, pagedadamw8bit, prodigy, "
         "adamwschedulefree) uses it, not lion; put its betas in optimizer_args.betas (a list of 2 numbers)"),
        ({"optimizer": "adafactor", "adam_epsilon": 1e-6}, "adam_epsilon: only the Adam family"),
        ({"optimizer": "sgdnesterov", "adam_betas": (0.8, 0.9)}, "not sgdnesterov; it takes no betas, so remove adam_betas"),
        ({"optimizer": "AdamWScheduleFree", "lr_scheduler": "cosine"}, "lr_scheduler: adamwschedulefree follows no decaying "
         "schedule (cosine), it averages its weights instead; set lr_scheduler: constant, or constant_with_warmup"),
        ({"optimizer": "adamwschedulefree", "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 0.1},
         "lr_warmup_steps: adamwschedulefree warms up over a number of steps; give lr_warmup_steps in steps"),
        ({"optimizer": "adamwschedulefree", "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 10,
          "optimizer_args": {"warmup_steps": 5}}, "optimizer_args.warmup_steps: repeats lr_warmup_steps"),
        ({"optimizer": "adamwschedulefree", "ema": {"enabled": True}}, "ema: adamwschedulefree already averages its weights"),
        ({"optimizer_args": {"fused": {"a": 1}}}, "fused: must be true/false, a number, a text or a list of numbers"),
    ],
)
def test_optimizer_settings_errors(fields, expected):
    assert expected in _problem(**fields)


def test_the_kohya_spellings_are_accepted():
    spellings = {"AdamW8bit": "adamw8bit", "PagedAdamW8bit": "pagedadamw8bit", "Lion8bit": "lion8bit", "Prodigy": "prodigy",
                 "AdaFactor": "adafactor", "CAME": "came", "AdamWScheduleFree": "adamwschedulefree", "SGDNesterov": "sgdnesterov"}
    for kohya, ours in spellings.items():
        assert TrainingConfig(optimizer=kohya).optimizer == ours


def test_a_resolved_config_loads_again(tmp_path):
    raw = small_raw_config(tmp_path)
    raw["training"].update(optimizer="lion", optimizer_args={"betas": [0.95, 0.98]})
    config = parse_config(raw)
    assert "adam_betas" in dump_config(config)  # every default written out, Adam's betas included
    assert parse_config(json.loads(json.dumps(config.model_dump(mode="json")))) == config


# bitsandbytes' backend, checked when the config loads ----------------------------------------------------------


def test_bitsandbytes_runs_its_8bit_optimizers_on_this_cpu():
    assert bitsandbytes_problem("cpu") is None


def test_8bit_on_a_gpu_without_bitsandbytes_cuda_library_is_a_config_error(monkeypatch, tmp_path):
    from bitsandbytes import cextension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cextension, "lib", cextension.ErrorHandlerMockBNBNativeLibrary("CUDA binary not found"))
    raw = small_raw_config(tmp_path)
    raw["training"]["optimizer"] = "AdamW8bit"
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("config: training.optimizer: adamw8bit needs bitsandbytes' native CUDA kernels, but bitsandbytes")
    assert "has no native library for this machine's CUDA" in message
    assert message.endswith("install a bitsandbytes build for this machine (pip install -U bitsandbytes) or use adamw")
    assert parse_config({**raw, "training": {**raw["training"], "optimizer": "adamw"}}).training.optimizer == "adamw"


@pytest.mark.parametrize("name", [name for name, spec in OPTIMIZERS.items() if spec.eight_bit])
def test_8bit_without_bitsandbytes_cpu_kernel_is_a_config_error(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda operator, key: False)
    assert f"optimizer: {name} needs bitsandbytes' native CPU kernels, but bitsandbytes" in _problem(optimizer=name)
    TrainingConfig(optimizer="lion")  # pytorch-optimizer's Lion needs no bitsandbytes


def test_8bit_when_bitsandbytes_does_not_import_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` then raises: ImportError
    assert "optimizer: lion8bit needs bitsandbytes' native" in _problem(optimizer="lion8bit")
    assert "but bitsandbytes failed to load (" in _problem(optimizer="lion8bit")


# The real pipeline, once ---------------------------------------------------------------------------------------


def test_training_with_prodigy_end_to_end(raw_config):
    from lora_trainer.export.lora_file import read_lora_file

    raw_config["training"].update(optimizer="Prodigy", learning_rate=1.0, max_steps=2)
    run, path = train_in_process(raw_config)
    inner = getattr(run.optimizer, "optimizer", run.optimizer)  # Accelerate's wrapper
    assert type(inner).__name__ == "Prodigy"
    assert all(group["k"] == 2 for group in inner.param_groups)  # two steps taken
    assert read_lora_file(path).metadata["ss_optimizer"].startswith("prodigyopt.Prodigy(betas=(0.9, 0.999),eps=1e-08,")
