"""Noise extras, timestep distributions and zero-terminal SNR, each checked against its formula written out here."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from lora_trainer.config.objective import ObjectiveConfig
from lora_trainer.fit.objective import draw_training_noise, seeded_noise_and_timesteps
from lora_trainer.fit.timesteps import draw_timesteps, timestep_probabilities
from lora_trainer.report.history import RunHistory
from lora_trainer.report.plots import write_timestep_histogram

T = 1000
SHAPE = (4, 16, 16)


def _latents(count: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.zeros((count, *shape))


def _draw(count: int, shape: tuple[int, ...] = SHAPE, first_seed: int = 0, **settings):
    return draw_training_noise(_latents(count, shape), range(first_seed, first_seed + count), ObjectiveConfig(**settings), T)


# --- the plain draw and determinism ---


def test_default_draw_is_a_gaussian_then_a_uniform_integer_from_each_seed():
    seeds = [3, 11, 2**40]
    draw = draw_training_noise(_latents(3), seeds, ObjectiveConfig(), T)
    for index, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        assert torch.equal(draw.noise[index], torch.randn(SHAPE, generator=generator))
        assert draw.timesteps[index] == torch.randint(0, T, (1,), generator=generator)[0]
    assert draw.input_noise is draw.noise
    assert draw.timesteps.dtype == torch.int64
    noise, timesteps = seeded_noise_and_timesteps(_latents(3), T, seeds)
    assert torch.equal(noise, draw.noise) and torch.equal(timesteps, draw.timesteps)


EVERYTHING = dict(
    noise_offset=0.1, noise_offset_random_strength=True, multires_noise_iterations=4, multires_noise_discount=0.5,
    ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, timestep_distribution="logit_normal",
)


def test_an_images_draw_depends_on_its_seed_alone():
    objective = ObjectiveConfig(**EVERYTHING)
    alone = draw_training_noise(_latents(1), [7], objective, T)
    in_a_batch = draw_training_noise(_latents(3), [5, 7, 9], objective, T)
    again = draw_training_noise(_latents(3), [5, 7, 9], objective, T)
    for field in ("noise", "input_noise", "timesteps"):
        assert torch.equal(getattr(alone, field)[0], getattr(in_a_batch, field)[1])
        assert torch.equal(getattr(in_a_batch, field), getattr(again, field))
    assert not torch.equal(in_a_batch.noise[0], in_a_batch.noise[1])


def test_extras_leave_the_base_noise_and_timestep_as_they_were():
    plain, extra = _draw(8), _draw(8, ip_noise_gamma=0.2, noise_offset=0.1)
    assert torch.equal(plain.timesteps, extra.timesteps)
    assert not torch.equal(plain.noise, extra.noise)


# --- offset noise ---


def test_offset_noise_shifts_each_channel_by_offset_times_a_normal():
    count, offset, (channels, height, width) = 2000, 0.5, SHAPE
    plain, shifted = _draw(count), _draw(count, noise_offset=offset)
    shift = shifted.noise - plain.noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6), "one constant per channel"
    assert shift[:, :, 0, 0].std().item() == pytest.approx(offset, rel=0.05)
    # Per-sample channel means: white noise contributes 1 / (H * W), the offset offset^2.
    means = shifted.noise.mean(dim=(2, 3))
    assert means.var().item() == pytest.approx(1 / (height * width) + offset**2, rel=0.06)
    assert channels == means.shape[1]


def test_random_offset_strength_is_uniform_in_zero_to_one():
    count, offset = 2000, 0.5
    shift = (_draw(count, noise_offset=offset, noise_offset_random_strength=True).noise - _draw(count).noise)[:, :, 0, 0]
    # offset * u * z with u ~ U[0, 1) and z ~ N(0, 1): variance offset^2 * E[u^2] = offset^2 / 3.
    assert shift.var().item() == pytest.approx(offset**2 / 3, rel=0.08)


# --- multi-resolution noise ---


def _pyramid_by_formula(seed: int, iterations: int, discount: float) -> torch.Tensor:
    """kohya's pyramid_noise_like, per image, with the image's generator drawing in the documented order."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator)
    torch.randint(0, T, (1,), generator=generator)  # the timestep comes second
    channels, height, width = SHAPE
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    for level in range(iterations):
        r = torch.rand(1, generator=generator).item() * 2 + 2
        small_height, small_width = max(1, int(height / r**level)), max(1, int(width / r**level))
        noise = noise + upsample(torch.randn(1, channels, small_height, small_width, generator=generator))[0] * discount**level
        if small_height == 1 or small_width == 1:
            break
    return noise / noise.std()


def test_multires_noise_is_kohyas_pyramid():
    draw = _draw(3, first_seed=40, multires_noise_iterations=6, multires_noise_discount=0.4)
    for index in range(3):
        assert torch.allclose(draw.noise[index], _pyramid_by_formula(40 + index, 6, 0.4), atol=1e-5)


def _lag_one_correlation(noise: torch.Tensor) -> float:
    left, right = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([left, right]))[0, 1].item()


def test_multires_noise_has_unit_std_and_is_spatially_correlated():
    white, pyramid = _draw(64), _draw(64, multires_noise_iterations=6, multires_noise_discount=0.8)
    assert pyramid.noise.shape == (64, *SHAPE)
    assert torch.allclose(pyramid.noise.flatten(1).std(dim=1), torch.ones(64), atol=1e-5)
    assert abs(_lag_one_correlation(white.noise)) < 0.03
    assert _lag_one_correlation(pyramid.noise) > 0.15  # about 0.27 here: two white parts of unit weight dilute it


# --- input perturbation ---


def test_input_perturbation_adds_gamma_times_an_independent_normal_to_the_input_only():
    count, gamma = 256, 0.1
    plain, perturbed = _draw(count), _draw(count, ip_noise_gamma=gamma)
    assert torch.equal(perturbed.noise, plain.noise), "the target's noise is unchanged"
    for index in (0, 5):
        generator = torch.Generator().manual_seed(index)
        noise = torch.randn(SHAPE, generator=generator)
        torch.randint(0, T, (1,), generator=generator)
        assert torch.allclose(perturbed.input_noise[index], noise + gamma * torch.randn(SHAPE, generator=generator))
    extra = (perturbed.input_noise - perturbed.noise) / gamma
    assert extra.std().item() == pytest.approx(1.0, abs=0.01)
    assert abs(torch.corrcoef(torch.stack([extra.flatten(), plain.noise.flatten()]))[0, 1].item()) < 0.01


def test_random_input_perturbation_strength_scales_each_image_by_a_uniform():
    count, gamma = 400, 0.1
    draw = _draw(count, ip_noise_gamma=gamma, ip_noise_gamma_random_strength=True)
    strengths = ((draw.input_noise - draw.noise) / gamma).flatten(1).std(dim=1)  # u per image, up to sampling noise
    assert strengths.max().item() < 1.1
    assert strengths.mean().item() == pytest.approx(0.5, abs=0.05)
    assert (strengths < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.07)


# --- timestep distributions ---


def _normal_cdf(value: float) -> float:
    return 0.5 * (1 + math.erf(value / math.sqrt(2)))


def _configured_cdf(settings: dict, x: float) -> float:
    """P(X <= x) for the distribution's number in [0, 1), from the formulas of the config's docstring."""
    if x <= 0 or x >= 1:
        return min(max(x, 0.0), 1.0)
    name = settings.get("timestep_distribution", "uniform")
    if name == "logit_normal":
        return _normal_cdf((math.log(x / (1 - x)) - settings.get("logit_mean", 0.0)) / settings.get("logit_std", 1.0))
    if name == "shifted":
        shift = settings["timestep_shift"]
        return x / (shift - (shift - 1) * x)  # u = x / (shift - (shift - 1) x) inverts x = shift u / (1 + (shift - 1) u)
    return x


def _ks_distance(timesteps: torch.Tensor, settings: dict, low: int, high: int, cdf=_configured_cdf) -> float:
    """max over integers k of |empirical P(t <= k) - P(low + floor(x (high - low)) <= k)|."""
    counts = torch.bincount(timesteps - low, minlength=high - low).double()
    empirical = (counts.cumsum(0) / counts.sum()).tolist()
    return max(abs(empirical[k] - cdf(settings, (k + 1) / (high - low))) for k in range(high - low))


DISTRIBUTIONS = [
    {"timestep_distribution": "uniform"},
    {"timestep_distribution": "uniform", "min_timestep": 200, "max_timestep": 700},
    {"timestep_distribution": "logit_normal"},
    {"timestep_distribution": "logit_normal", "logit_mean": 0.5, "logit_std": 0.7, "min_timestep": 100, "max_timestep": 900},
    {"timestep_distribution": "shifted", "timestep_shift": 3.0},
    {"timestep_distribution": "shifted", "timestep_shift": 0.4, "max_timestep": 500},
]


@pytest.mark.parametrize("settings", DISTRIBUTIONS, ids=lambda settings: "-".join(f"{value}" for value in settings.values()))
def test_timesteps_follow_the_configured_distribution_within_the_range(settings):
    low, high = settings.get("min_timestep", 0), settings.get("max_timestep", T)
    timesteps = draw_timesteps(ObjectiveConfig(**settings), T, torch.Generator().manual_seed(1), count=20000)
    assert timesteps.dtype == torch.int64
    assert timesteps.min().item() >= low and timesteps.max().item() < high
    # 1.63 / sqrt(n) is the KS bound at the 1% level; the draw is fixed, so this never flakes.
    assert _ks_distance(timesteps, settings, low, high) < 1.63 / math.sqrt(20000)


def test_the_distribution_check_tells_distributions_apart():
    shifted = draw_timesteps(ObjectiveConfig(timestep_distribution="shifted", timestep_shift=3.0), T, torch.Generator().manual_seed(1), 20000)
    assert _ks_distance(shifted, {"timestep_distribution": "uniform"}, 0, T) > 0.2
    logit = draw_timesteps(ObjectiveConfig(timestep_distribution="logit_normal"), T, torch.Generator().manual_seed(1), 20000)
    assert _ks_distance(logit, {"timestep_distribution": "uniform"}, 0, T) > 0.1


def test_shift_above_one_favours_noisier_timesteps():
    later = draw_timesteps(ObjectiveConfig(timestep_distribution="shifted", timestep_shift=3.0), T, torch.Generator().manual_seed(2), 5000)
    earlier = draw_timesteps(ObjectiveConfig(timestep_distribution="shifted", timestep_shift=0.5), T, torch.Generator().manual_seed(2), 5000)
    assert later.double().mean() > 600 > 500 > 400 > earlier.double().mean()


def test_the_plotted_density_is_the_drawn_distribution():
    settings = {"timestep_distribution": "logit_normal", "logit_mean": -0.3, "min_timestep": 100, "max_timestep": 900}
    probabilities = timestep_probabilities(ObjectiveConfig(**settings), T)
    assert len(probabilities) == T and sum(probabilities) == pytest.approx(1.0)
    assert sum(probabilities[:100]) == 0 and sum(probabilities[900:]) == 0
    for k in (100, 400, 899):
        expected = _configured_cdf(settings, (k + 1 - 100) / 800) - _configured_cdf(settings, (k - 100) / 800)
        assert probabilities[k] == pytest.approx(expected)


def test_training_draws_follow_the_distribution_too():
    settings = {"timestep_distribution": "shifted", "timestep_shift": 2.0}
    draw = draw_training_noise(_latents(3000, (1, 1, 1)), range(3000), ObjectiveConfig(**settings), T)
    assert _ks_distance(draw.timesteps, settings, 0, T) < 1.63 / math.sqrt(3000)


# --- recording and plotting the draws ---


def test_history_counts_timesteps_and_keeps_them_through_json(tmp_path):
    history = RunHistory("run", 10)
    history.count_timesteps([0, 999, 5, 5], T)
    history.count_timesteps([5], T)
    assert len(history.timestep_counts) == T and sum(history.timestep_counts) == 5
    assert (history.timestep_counts[5], history.timestep_counts[999], history.timestep_counts[1]) == (3, 1, 0)
    history.save(tmp_path / "history.json")
    assert RunHistory.load(tmp_path / "history.json").timestep_counts == history.timestep_counts


def test_histogram_png_is_written_with_and_without_draws(tmp_path):
    probabilities = timestep_probabilities(ObjectiveConfig(timestep_distribution="shifted", timestep_shift=3.0), T)
    counts = torch.bincount(torch.randint(0, T, (500,), generator=torch.Generator().manual_seed(0)), minlength=T).tolist()
    for name, drawn in (("drawn.png", counts), ("empty.png", [])):
        write_timestep_histogram(tmp_path / name, drawn, probabilities, "run: timesteps drawn, shifted (shift 3)")
        with Image.open(tmp_path / name) as image:
            assert image.size == (800, 400)


# --- zero terminal SNR ---


def _algorithm_1(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (arXiv:2305.08891), Algorithm 1: shift sqrt(abar) to end at 0, scale it to start where it did."""
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].item(), root[-1].item()
    root = (root - last) * first / (first - last)
    abar = root**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def _sdxl_scheduler_config() -> dict:
    from diffusers import DDPMScheduler

    from lora_trainer.model.sources import SDXL_BASE_CONFIG

    return dict(DDPMScheduler.load_config(SDXL_BASE_CONFIG, subfolder="scheduler"))


def test_zero_terminal_snr_scheduler_is_algorithm_1():
    from lora_trainer.model.parts import training_noise_scheduler

    config = _sdxl_scheduler_config()
    original = training_noise_scheduler(config, "v_prediction", zero_terminal_snr=False)
    rescaled = training_noise_scheduler(config, "v_prediction", zero_terminal_snr=True)
    # The SD/SDXL schedule as the paper describes it: sqrt(abar_T) = 0.068265, SNR(T) = 0.004682.
    assert original.alphas_cumprod[-1].sqrt().item() == pytest.approx(0.068265, abs=2e-6)
    expected_betas = _algorithm_1(original.betas.double())
    assert torch.allclose(rescaled.betas.double(), expected_betas, atol=1e-6, rtol=1e-4)
    abar = rescaled.alphas_cumprod
    assert abar[-1].item() == 0.0
    assert abar[0].sqrt().item() == pytest.approx(original.alphas_cumprod[0].sqrt().item(), rel=1e-6)
    snr = abar.double() / (1 - abar.double())
    assert snr[-1].item() == 0.0 and bool((snr[1:] < snr[:-1]).all())
    expected_abar = torch.cumprod(1 - expected_betas, dim=0)
    assert torch.allclose(snr[:-1], expected_abar[:-1] / (1 - expected_abar[:-1]), rtol=2e-3)
    assert rescaled.config.prediction_type == "v_prediction"


def test_last_timestep_is_pure_noise_and_v_is_minus_the_latents():
    from lora_trainer.model.parts import training_noise_scheduler

    scheduler = training_noise_scheduler(_sdxl_scheduler_config(), "v_prediction", zero_terminal_snr=True)
    latents, noise = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    last = torch.full((2,), T - 1)
    assert torch.equal(scheduler.add_noise(latents, noise, last), noise)
    assert torch.allclose(scheduler.get_velocity(latents, noise, last), -latents)


def test_a_config_that_already_rescales_keeps_doing_so():
    from lora_trainer.model.parts import training_noise_scheduler

    config = {**_sdxl_scheduler_config(), "rescale_betas_zero_snr": True}
    assert training_noise_scheduler(config, "v_prediction", zero_terminal_snr=False).alphas_cumprod[-1].item() == 0.0


def test_the_run_schedule_follows_the_setting(tiny_model_path):
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.model.parts import load_sdxl

    parts = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl", prediction_type="v_prediction"))
    assert parts.noise_scheduler_for(True).alphas_cumprod[-1].item() == 0.0
    assert parts.noise_scheduler_for(False).alphas_cumprod[-1].item() > 0.0
    assert parts.noise_scheduler_for(False) is parts.noise_scheduler


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "ddim"])
def test_zero_terminal_snr_samplers_rescale_and_start_at_the_last_timestep(sampler):
    from lora_trainer.model.parts import training_noise_scheduler
    from lora_trainer.sampling.schedulers import make_scheduler, zero_terminal_snr_sampling

    base = zero_terminal_snr_sampling(training_noise_scheduler(_sdxl_scheduler_config(), "v_prediction", zero_terminal_snr=False))
    scheduler = make_scheduler(sampler, base.config, "v_prediction")
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    scheduler.set_timesteps(10)
    if sampler != "dpm++_2m_karras":  # Karras sigmas place their own timesteps
        assert int(scheduler.timesteps[0]) == T - 1


# --- through the training pipeline ---


def test_a_run_with_every_extra_trains_records_its_timesteps_and_samples_as_the_paper_says(raw_config):
    from conftest import train_in_process

    raw_config["model"]["prediction_type"] = "v_prediction"
    raw_config["objective"] = {**EVERYTHING, "zero_terminal_snr": True}
    raw_config["sample"] = {"prompts": ["a red circle"], "steps": 2, "before_training": False}
    run, _ = train_in_process(raw_config)
    assert all(math.isfinite(loss) for loss in run.history.train_losses) and len(run.history.train_losses) == 3
    assert sum(run.history.timestep_counts) == 3 * raw_config["training"]["batch_size"]
    assert run.noise_scheduler.alphas_cumprod[-1].item() == 0.0
    drawer = run.evaluator.drawer
    assert drawer.scheduler.config.timestep_spacing == "trailing" and drawer.scheduler.config.rescale_betas_zero_snr
    assert drawer.guidance_rescale == 0.7
    assert list((run.config.output.dir / "samples").glob("*.png")), "the sample round drew through the pipeline"
    with Image.open(run.config.output.dir / "test_lora-timesteps.png") as image:
        assert image.size == (800, 400)
