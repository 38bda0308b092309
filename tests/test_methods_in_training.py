"""The training methods together in one real run on the tiny SDXL: what reaches the optimizer, the logs, the files
and the metadata. Each method's formula is tested alone (test_losses, test_noise_and_timesteps, test_schedules,
test_param_groups, test_optimizers, test_ema); this checks that the run wires them in."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tensorboard_scalars, train_in_process

from lora_trainer.adapters.lora import ADAPTER_NAME, lora_layers
from lora_trainer.export.lora_file import read_lora_file

STEPS = 4
UNET_RATE, TE1_RATE, TE2_RATE, LORAPLUS = 1e-3, 2e-4, 3e-4, 4.0
MAX_NORM = 0.05


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory, tiny_model_path):
    from conftest import small_raw_config

    raw = small_raw_config(tmp_path_factory.mktemp("methods"))
    raw["training"].update(
        max_steps=STEPS, learning_rate=UNET_RATE, lr_scheduler="cosine", lr_scheduler_min_lr_ratio=0.1, lr_warmup_steps=0.25,
    )
    raw["network"].update(
        text_encoder_1_learning_rate=TE1_RATE, text_encoder_2_learning_rate=TE2_RATE, loraplus_lr_ratio=LORAPLUS,
        scale_weight_norms=MAX_NORM,
    )
    raw["objective"] = {
        "noise_offset": 0.05, "multires_noise_iterations": 3, "ip_noise_gamma": 0.1, "min_snr_gamma": 5,
        "loss_type": "huber", "huber_schedule": "exponential", "timestep_distribution": "logit_normal",
        "min_timestep": 100, "max_timestep": 900,
    }
    run, path = train_in_process(raw)
    return run, path


def test_each_part_and_the_up_matrices_get_their_rate(methods_run):
    run, _ = methods_run
    rates = {group["name"]: group["initial_lr"] for group in run.optimizer.param_groups}
    assert rates == {
        "unet": UNET_RATE, "unet/lora_up": UNET_RATE * LORAPLUS,
        "text_encoder_1": TE1_RATE, "text_encoder_1/lora_up": TE1_RATE * LORAPLUS,
        "text_encoder_2": TE2_RATE, "text_encoder_2/lora_up": TE2_RATE * LORAPLUS,
    }


def test_the_logged_rate_is_the_one_each_step_trained_at(methods_run):
    run, _ = methods_run
    # 1 warmup step (a quarter of 4), then cosine from the peak down to a tenth of it over the other 3.
    def factor(index: int) -> float:
        if index < 1:
            return index / 1
        progress = (index - 1) / (STEPS - 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    logged = tensorboard_scalars(run.config.output.dir / "logs", "lr/unet")
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    for step, value in logged:
        assert value == pytest.approx(UNET_RATE * factor(step - 1), rel=1e-5, abs=1e-12)


def test_max_norm_bounds_every_adapter(methods_run):
    run, _ = methods_run
    assert tensorboard_scalars(run.config.output.dir / "logs", "max_norm/keys_scaled")
    for model in run.trained.values():
        for layer in lora_layers(run.accelerator.unwrap_model(model)).values():
            down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            norm = torch.linalg.matrix_norm(layer.scaling[ADAPTER_NAME] * (up.flatten(1) @ down.flatten(1)))
            assert norm <= MAX_NORM * (1 + 1e-4)


def test_the_timesteps_drawn_stay_in_range_and_are_drawn_as_a_histogram(methods_run):
    run, _ = methods_run
    counts = run.history.timestep_counts
    assert sum(counts) == STEPS * run.config.training.batch_size
    assert sum(counts[:100]) == 0 and sum(counts[900:]) == 0
    from PIL import Image

    with Image.open(run.config.output.dir / "test_lora-timesteps.png") as image:
        assert image.size[0] > 100


def test_the_metadata_names_every_method_as_kohya_does(methods_run):
    _, path = methods_run
    metadata = read_lora_file(path).metadata
    assert metadata["ss_noise_offset"] == "0.05"
    assert metadata["ss_multires_noise_iterations"] == "3"
    assert metadata["ss_ip_noise_gamma"] == "0.1"
    assert metadata["ss_min_snr_gamma"] == "5.0"
    assert (metadata["ss_loss_type"], metadata["ss_huber_schedule"]) == ("huber", "exponential")
    assert metadata["ss_text_encoder_lr"] == f"[{TE1_RATE}, {TE2_RATE}]"
    assert metadata["ss_scale_weight_norms"] == str(MAX_NORM)
    assert json.loads(metadata["ss_network_args"]) == {"loraplus_lr_ratio": str(LORAPLUS)}
    assert metadata["ss_optimizer"].startswith("torch.optim.AdamW(")
    assert metadata["ss_lr_scheduler"] == "cosine"
    assert json.loads(metadata["lora_train_timesteps"]) == {
        "distribution": "logit_normal", "min_timestep": 100, "max_timestep": 900, "logit_mean": 0.0, "logit_std": 1.0,
    }


def test_a_schedule_free_run_saves_its_averaged_weights(raw_config):
    from safetensors.torch import load_file

    from lora_trainer.adapters.model_weights import read_lora_weights
    from lora_trainer.export.lora_file import to_kohya_tensors
    from lora_trainer.fit.optim import optimizer_in_eval_mode

    raw_config["training"].update(optimizer="adamwschedulefree", lr_scheduler="constant", max_steps=2)
    run, path = train_in_process(raw_config)
    saved = load_file(path)

    def exported() -> dict[str, torch.Tensor]:
        models = {part: run.accelerator.unwrap_model(model) for part, model in run.trained.items()}
        tensors = to_kohya_tensors({part: (model, read_lora_weights(model)) for part, model in models.items()}, torch.float32)
        return {key: tensor.clone() for key, tensor in tensors.items()}  # they may share the adapters' memory

    with optimizer_in_eval_mode(run.optimizer):  # the method's x, its average: what it prescribes to evaluate and keep
        averaged = exported()
    training_mode = exported()  # y, where the gradients were taken
    ups = [key for key in saved if key.endswith("lora_up.weight")]
    # Each switch between the modes recomputes the weights from the other set, so they agree up to rounding.
    for key in saved:
        torch.testing.assert_close(saved[key], averaged[key], rtol=1e-5, atol=1e-8)
    assert max((saved[key] - training_mode[key]).abs().max().item() for key in ups) > 1e-6  # rounding is far below


# Every optimizer and schedule on the tiny SDXL: a few real steps of the training step, one setup shared.

OPTIMIZER_RATES = {"prodigy": 1.0, "sgdnesterov": 1e-2}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_path):
    from conftest import small_raw_config

    from lora_trainer.config.load import parse_config
    from lora_trainer.fit.loader import collate
    from lora_trainer.fit.setup import setup

    raw = small_raw_config(tmp_path_factory.mktemp("optimizers"))
    raw["network"].update(train_text_encoder_1=False, train_text_encoder_2=False)
    run = setup(parse_config(raw))
    dataset = run.dataloader.dataset
    batch = collate([dataset[(index, 1)] for index in range(2)])
    yield run, batch
    run.accelerator.end_training()


def _steps(run, batch, optimizer, schedule=None, count: int = 3) -> list[float]:
    from lora_trainer.fit.objective import seeded_noise_and_timesteps
    from lora_trainer.fit.optim import optimizer_train_mode
    from lora_trainer.fit.step import training_step

    optimizer_train_mode(optimizer)
    losses = []
    for step in range(count):
        noise, timesteps = seeded_noise_and_timesteps(batch["latents"], 1000, [step, step + 100])
        loss = training_step(run.unet, run.encode_captions, run.noise_scheduler, batch, noise, timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "pagedadamw8bit", "lion", "lion8bit", "prodigy", "adafactor", "came",
                                  "adamwschedulefree", "sgdnesterov"])
def test_each_optimizer_steps_the_tiny_sdxl(tiny_run, name):
    from lora_trainer.config.training import TrainingConfig
    from lora_trainer.fit.optim import make_optimizer
    from lora_trainer.fit.param_groups import parameter_groups

    run, batch = tiny_run
    rate = OPTIMIZER_RATES.get(name, 1e-3)
    config = run.config.model_copy(update={"training": TrainingConfig(optimizer=name, learning_rate=rate)})
    groups = parameter_groups({"unet": run.accelerator.unwrap_model(run.trained["unet"])}, config)
    optimizer = make_optimizer(groups, config.training)
    before = [parameter.detach().clone() for group in groups for parameter in group["params"]]
    losses = _steps(run, batch, optimizer)
    after = [parameter.detach() for group in groups for parameter in group["params"]]
    assert all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(old, new) for old, new in zip(before, after)), f"{name} moved no adapter"


@pytest.mark.parametrize(
    "schedule, options",
    [("constant", {}), ("constant_with_warmup", {"lr_warmup_steps": 2}), ("linear", {"lr_warmup_steps": 1}),
     ("cosine", {"lr_scheduler_min_lr_ratio": 0.1}), ("cosine_with_restarts", {"lr_scheduler_num_cycles": 2}),
     ("polynomial", {"lr_scheduler_power": 2.0, "lr_warmup_steps": 0.25})],
)
def test_each_schedule_drives_the_tiny_sdxl(tiny_run, schedule, options):
    from lora_trainer.config.training import TrainingConfig
    from lora_trainer.fit.optim import make_optimizer
    from lora_trainer.fit.param_groups import parameter_groups
    from lora_trainer.fit.schedules import learning_rate_at, make_lr_scheduler

    run, batch = tiny_run
    training = TrainingConfig(learning_rate=1e-3, lr_scheduler=schedule, **options)
    config = run.config.model_copy(update={"training": training})
    optimizer = make_optimizer(parameter_groups({"unet": run.accelerator.unwrap_model(run.trained["unet"])}, config), training)
    lr_schedule = make_lr_scheduler(optimizer, training, total_steps=4)
    rates = []
    for _ in range(3):
        rates.append(optimizer.param_groups[0]["lr"])
        _steps(run, batch, optimizer, lr_schedule, count=1)
    assert rates == pytest.approx([learning_rate_at(training, 4, step) for step in (1, 2, 3)], abs=1e-12)
