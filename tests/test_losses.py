"""Loss types, huber's delta schedules, the masked reduction and the SNR weightings equal formulas written here.

The references are written from the papers and kohya sd-scripts' formulas (`conditional_loss`,
`get_huber_threshold_if_needed`, `apply_snr_weight`, `apply_debiased_estimation`), in float64 Python math or
plain tensor arithmetic, never by calling the code under test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from lora_trainer.config.objective import ObjectiveConfig
from lora_trainer.fit.losses import denoising_loss, elementwise_loss, huber_delta, per_sample_loss
from lora_trainer.fit.objective import prediction_target
from lora_trainer.fit.step import training_step
from lora_trainer.fit.weighting import debiased_weights, min_snr_weights, snr

TIMESTEPS = [0, 1, 10, 100, 500, 998, 999]
PREDICTION_TYPES = ["epsilon", "v_prediction"]


def _scheduler(zero_terminal_snr: bool, prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
    )


SCHEDULERS = {"sdxl": _scheduler(False), "ztsnr": _scheduler(True)}


def _alpha_bar(name: str, t: int) -> float:
    return float(SCHEDULERS[name].alphas_cumprod[t].double())


def _snr(name: str, t: int) -> float:
    alpha_bar = _alpha_bar(name, t)
    return alpha_bar / (1 - alpha_bar)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar_of_sdxls_schedule():
    # scaled_linear: betas are the squares of a linear ramp of their square roots (0.00085..0.012, 1000 steps).
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    alpha_bar, expected = 1.0, {}
    for t, beta in enumerate(betas):
        alpha_bar *= 1 - beta
        expected[t] = alpha_bar / (1 - alpha_bar)
    ours = snr(SCHEDULERS["sdxl"].alphas_cumprod, torch.tensor(TIMESTEPS))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), torch.tensor([expected[t] for t in TIMESTEPS], dtype=torch.float64), rtol=1e-3, atol=0)
    assert 1100 < ours[0] < 1300 and ours[-1] < 0.005  # nearly clean at t = 0, nearly pure noise at t = 999


def test_zero_terminal_snr_has_snr_zero_at_the_last_step_only():
    ours = snr(SCHEDULERS["ztsnr"].alphas_cumprod, torch.tensor(TIMESTEPS))
    assert ours[-1] == 0
    assert (ours[:-1] > 0).all()
    torch.testing.assert_close(ours.double(), torch.tensor([_snr("ztsnr", t) for t in TIMESTEPS], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_gamma_weights(name, prediction_type, gamma):
    def expected(t):
        value = _snr(name, t)
        if prediction_type == "v_prediction":
            return min(value, gamma) / (value + 1)
        return 1.0 if value == 0 else min(value, gamma) / value  # its limit at SNR 0

    ours = min_snr_weights(snr(SCHEDULERS[name].alphas_cumprod, torch.tensor(TIMESTEPS)), gamma, prediction_type)
    torch.testing.assert_close(ours.double(), torch.tensor([expected(t) for t in TIMESTEPS], dtype=torch.float64), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_debiased_estimation_weights(name, prediction_type):
    def expected(t):
        value = min(_snr(name, t), 1000.0)  # kohya caps SNR at 1000 (t = 0 is about 1175 on SDXL)
        if prediction_type == "v_prediction":
            return 1 / (value + 1)
        return 1 / math.sqrt(max(value, 1e-3))  # the documented floor, for SNR 0

    ours = debiased_weights(snr(SCHEDULERS[name].alphas_cumprod, torch.tensor(TIMESTEPS)), prediction_type)
    torch.testing.assert_close(ours.double(), torch.tensor([expected(t) for t in TIMESTEPS], dtype=torch.float64), rtol=1e-4, atol=1e-7)


def test_debiased_estimation_caps_snr_at_1000():
    # t = 0 on SDXL: SNR about 1175 > 1000, so its weight is that of SNR 1000.
    assert debiased_weights(torch.tensor([1175.0]), "epsilon").item() == pytest.approx(1 / math.sqrt(1000))
    assert debiased_weights(torch.tensor([1175.0]), "v_prediction").item() == pytest.approx(1 / 1001)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("weighting", ["min_snr_gamma", "debiased"])
def test_weights_at_snr_zero_are_finite(prediction_type, weighting):
    zero = snr(SCHEDULERS["ztsnr"].alphas_cumprod, torch.tensor([999, 999]))
    assert (zero == 0).all()
    weights = min_snr_weights(zero, 5.0, prediction_type) if weighting == "min_snr_gamma" else debiased_weights(zero, prediction_type)
    assert torch.isfinite(weights).all()
    expected = {
        ("min_snr_gamma", "epsilon"): 1.0,  # min(SNR, gamma) / SNR is 1 for every SNR below gamma
        ("min_snr_gamma", "v_prediction"): 0.0,  # min(0, gamma) / (0 + 1)
        ("debiased", "epsilon"): 1 / math.sqrt(1e-3),
        ("debiased", "v_prediction"): 1.0,  # 1 / (0 + 1)
    }[weighting, prediction_type]
    torch.testing.assert_close(weights, torch.full((2,), expected))


def _prediction_and_target(shape=(3, 4, 6, 6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_elementwise_losses_are_kohyas_formulas():
    prediction, target = _prediction_and_target()
    prediction[0, 0, 0, :3] = target[0, 0, 0, :3] + torch.tensor([1e-4, -3.0, 8.0])  # tiny and large errors
    delta = torch.tensor([0.1, 0.5, 1.0])
    x, d = (prediction - target).double(), delta.double().view(-1, 1, 1, 1)
    expected = {
        "l2": x**2,
        "l1": x.abs(),
        "huber": 2 * d * (torch.sqrt(x**2 + d**2) - d),
        "smooth_l1": 2 * (torch.sqrt(x**2 + d**2) - d),
    }
    for loss_type, reference in expected.items():
        ours = elementwise_loss(prediction, target, loss_type, delta if loss_type in ("huber", "smooth_l1") else None)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-9, msg=loss_type)


def test_pseudo_huber_is_quadratic_for_small_errors_and_linear_for_large():
    target = torch.zeros(1, 1, 1, 2)
    prediction = torch.tensor([[[[1e-3, 100.0]]]])
    loss = elementwise_loss(prediction, target, "huber", torch.tensor([0.1]))
    assert loss[0, 0, 0, 0].item() == pytest.approx(1e-6, rel=1e-3)  # about x^2
    assert loss[0, 0, 0, 1].item() == pytest.approx(2 * 0.1 * 100.0, rel=2e-3)  # about 2 * delta * |x|


def test_loss_in_low_precision_is_computed_in_fp32():
    prediction, target = _prediction_and_target()
    ours = elementwise_loss(prediction.bfloat16(), target.bfloat16(), "l2")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, (prediction.bfloat16().float() - target.bfloat16().float()) ** 2)


def _huber_objective(schedule: str, scale: float, c: float = 0.1) -> ObjectiveConfig:
    return ObjectiveConfig(loss_type="huber", huber_schedule=schedule, huber_c=c, huber_scale=scale)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_delta_schedules(name, scale, schedule):
    c = 0.1

    def expected(t):
        if schedule == "constant":
            return c * scale
        if schedule == "exponential":
            alpha = -math.log(c) / 1000  # kohya: exp(-alpha * t), alpha = -ln(huber_c) / T
            return math.exp(-alpha * t) * scale
        alpha_bar = _alpha_bar(name, t)
        if alpha_bar == 0:  # pure noise: sigma is infinite, the delta is huber_c
            return c * scale
        sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
        return ((1 - c) / (1 + sigma) ** 2 + c) * scale

    timesteps = torch.tensor(TIMESTEPS)
    ours = huber_delta(_huber_objective(schedule, scale, c), SCHEDULERS[name].alphas_cumprod, timesteps)
    assert ours.shape == timesteps.shape and torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), torch.tensor([expected(t) for t in TIMESTEPS], dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_huber_delta_snr_schedule_spans_one_to_huber_c():
    deltas = huber_delta(_huber_objective("snr", 1.0, c=0.2), SCHEDULERS["ztsnr"].alphas_cumprod, torch.tensor([0, 999]))
    assert deltas[0].item() == pytest.approx(1.0, abs=0.05)  # little noise: nearly 1
    assert deltas[1].item() == pytest.approx(0.2)  # pure noise: huber_c


def test_a_mask_of_ones_is_the_plain_mean():
    prediction, target = _prediction_and_target()
    loss = (prediction - target) ** 2
    torch.testing.assert_close(per_sample_loss(loss, torch.ones(3, 1, 6, 6)), loss.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(per_sample_loss(loss), loss.mean(dim=(1, 2, 3)))


def test_a_half_mask_is_the_loss_over_that_half():
    prediction, target = _prediction_and_target()
    loss = (prediction - target) ** 2
    mask = torch.zeros(3, 1, 6, 6)
    mask[:, :, :, :3] = 1  # the left half of every image
    mask[1] = 0
    mask[1, :, 2:, :] = 1  # the bottom two thirds of the second
    expected = torch.stack([loss[0, :, :, :3].mean(), loss[1, :, 2:, :].mean(), loss[2, :, :, :3].mean()])
    torch.testing.assert_close(per_sample_loss(loss, mask), expected)


def test_a_soft_mask_weighs_each_element():
    prediction, target = _prediction_and_target()
    loss = (prediction - target) ** 2
    mask = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    expected = torch.stack([(loss[i] * mask[i, 0]).sum() / (4 * mask[i, 0].sum()) for i in range(3)])
    torch.testing.assert_close(per_sample_loss(loss, mask), expected)


def test_an_all_zero_mask_gives_that_sample_zero_loss():
    prediction, target = _prediction_and_target()
    prediction.requires_grad_(True)
    loss = (prediction - target) ** 2
    mask = torch.ones(3, 1, 6, 6)
    mask[1] = 0
    ours = per_sample_loss(loss, mask)
    assert ours[1].item() == 0
    torch.testing.assert_close(ours[[0, 2]], loss[[0, 2]].mean(dim=(1, 2, 3)))
    ours.sum().backward()
    assert torch.isfinite(prediction.grad).all() and (prediction.grad[1] == 0).all()


def test_a_mask_of_the_wrong_size_is_refused():
    loss = torch.ones(2, 4, 6, 6)
    with pytest.raises(ValueError, match="loss mask of shape"):
        per_sample_loss(loss, torch.ones(2, 1, 12, 12))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_v_target_is_sqrt_alpha_bar_noise_minus_sqrt_one_minus_alpha_bar_latents(name):
    latents, noise = _prediction_and_target((len(TIMESTEPS), 4, 2, 2), seed=1)
    alpha_bar = torch.tensor([_alpha_bar(name, t) for t in TIMESTEPS]).view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    ours = prediction_target(SCHEDULERS[name], latents, noise, torch.tensor(TIMESTEPS), "v_prediction")
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert prediction_target(SCHEDULERS[name], latents, noise, torch.tensor(TIMESTEPS), "epsilon") is noise


def test_the_loss_composes_loss_type_mask_dataset_and_timestep_weights():
    prediction, target = _prediction_and_target()
    timesteps = torch.tensor([0, 500, 999])
    loss_weights = torch.tensor([1.0, 0.25, 2.0])
    mask = torch.ones(3, 1, 6, 6)
    mask[:, :, :2] = 0  # the top third ignored
    objective = ObjectiveConfig(loss_type="l1", min_snr_gamma=5.0, masked_loss=True)
    ours = denoising_loss(prediction, target, timesteps, SCHEDULERS["sdxl"].alphas_cumprod, "epsilon", objective, loss_weights, mask)

    per_sample = (prediction - target).abs()[:, :, 2:].mean(dim=(1, 2, 3)).double()
    snr_weight = torch.tensor([min(_snr("sdxl", t), 5.0) / _snr("sdxl", t) for t in timesteps.tolist()], dtype=torch.float64)
    expected = (per_sample * loss_weights.double() * snr_weight).mean()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0)


def test_masks_count_only_with_masked_loss():
    prediction, target = _prediction_and_target()
    timesteps, alphas_cumprod = torch.tensor([1, 2, 3]), SCHEDULERS["sdxl"].alphas_cumprod
    mask = torch.zeros(3, 1, 6, 6)
    mask[..., :3] = 1
    plain = denoising_loss(prediction, target, timesteps, alphas_cumprod, "epsilon", ObjectiveConfig(), None, mask)
    torch.testing.assert_close(plain, ((prediction - target) ** 2).mean())
    masked = denoising_loss(prediction, target, timesteps, alphas_cumprod, "epsilon", ObjectiveConfig(masked_loss=True), None, mask)
    torch.testing.assert_close(masked, ((prediction - target) ** 2)[..., :3].mean())


class _HalvingUnet(torch.nn.Module):
    """A stand-in UNet whose prediction is half its noisy input; it keeps the input it saw."""

    def forward(self, noisy, timesteps, encoder_hidden_states, added_cond_kwargs):
        self.seen = noisy
        return SimpleNamespace(sample=0.5 * noisy)


def _step_inputs(prediction_type: str):
    latents, noise = _prediction_and_target((2, 4, 4, 4), seed=2)
    batch = {"latents": latents, "captions": ["a", "b"], "time_ids": torch.zeros(2, 6), "loss_weights": torch.tensor([1.0, 0.5])}
    return _scheduler(False, prediction_type), batch, noise, torch.tensor([17, 901])


def _encode_captions(captions):
    return torch.zeros(len(captions), 77, 2048), torch.zeros(len(captions), 1280)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_step_without_objective_is_plain_weighted_mse(prediction_type):
    scheduler, batch, noise, timesteps = _step_inputs(prediction_type)
    unet = _HalvingUnet()
    ours = training_step(unet, _encode_captions, scheduler, batch, noise, timesteps)

    latents = batch["latents"]
    alpha_bar = torch.tensor([_alpha_bar("sdxl", t) for t in timesteps.tolist()]).view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    expected = (((0.5 * noisy - target) ** 2).mean(dim=(1, 2, 3)) * batch["loss_weights"]).mean()
    torch.testing.assert_close(unet.seen, noisy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_training_step_input_noise_goes_into_the_input_only():
    scheduler, batch, noise, timesteps = _step_inputs("epsilon")
    input_noise = noise + 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(4))
    unet = _HalvingUnet()
    ours = training_step(unet, _encode_captions, scheduler, batch, noise, timesteps, objective=ObjectiveConfig(), input_noise=input_noise)

    alpha_bar = torch.tensor([_alpha_bar("sdxl", t) for t in timesteps.tolist()]).view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * batch["latents"] + (1 - alpha_bar).sqrt() * input_noise
    expected = (((0.5 * noisy - noise) ** 2).mean(dim=(1, 2, 3)) * batch["loss_weights"]).mean()  # target: the noise
    torch.testing.assert_close(unet.seen, noisy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_training_step_applies_the_objective():
    scheduler, batch, noise, timesteps = _step_inputs("v_prediction")
    objective = ObjectiveConfig(debiased_estimation=True)
    ours = training_step(_HalvingUnet(), _encode_captions, scheduler, batch, noise, timesteps, objective=objective)

    latents = batch["latents"]
    alpha_bar = torch.tensor([_alpha_bar("sdxl", t) for t in timesteps.tolist()]).view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    snr_values = alpha_bar.flatten() / (1 - alpha_bar.flatten())
    expected = (((0.5 * noisy - target) ** 2).mean(dim=(1, 2, 3)) * batch["loss_weights"] / (snr_values + 1)).mean()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
