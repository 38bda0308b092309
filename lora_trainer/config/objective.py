"""The `objective` section: how noise and timesteps are drawn and how the denoising loss is weighed.

Every field is off (or uniform, or plain MSE) by default, which is SDXL's own training objective. Field names
follow kohya sd-scripts where kohya has the method, so a kohya user finds the knob under the name they know.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lora_trainer.config.section import Section

SDXL_TIMESTEPS = 1000
"""The length of SDXL's noise schedule (`num_train_timesteps` of every SDXL scheduler config)."""


class ObjectiveConfig(Section):
    noise_offset: float = Field(0.0, ge=0)
    """Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): adds `noise_offset * randn(B, C, 1, 1)` to
    the noise, so the model learns to shift an image's mean brightness (very dark or bright images). Community
    values 0.03-0.1; 0 turns it off."""

    noise_offset_random_strength: bool = False
    """Scale the offset by a uniform random number in [0, 1) per image (kohya's `noise_offset_random_strength`)."""

    multires_noise_iterations: int = Field(0, ge=0)
    """Multi-resolution (pyramid) noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training"), as
    kohya's `pyramid_noise_like`: this many extra noises, the i-th (from 0) drawn at 1 / r^i of the latent's size
    (r uniform in [2, 4), stopping at a side of 1), upsampled bilinearly and added, the sum scaled back to unit
    standard deviation; kohya users take 6-10. Applied after the offset noise, as kohya does. 0 turns it off."""

    multires_noise_discount: float = Field(0.3, gt=0, le=1)
    """Weight of each coarser scale of multires noise is `discount ** scale` (kohya's default 0.3; 0.1 for LoRA in
    the original write-up)."""

    ip_noise_gamma: float = Field(0.0, ge=0)
    """Input perturbation (Ning et al. 2023, arXiv:2301.11706): extra `gamma * randn` noise in the UNet's input
    only, the target staying the original noise; reduces exposure bias. Typical 0.1; 0 turns it off."""

    ip_noise_gamma_random_strength: bool = False
    """Scale `ip_noise_gamma` by a uniform random number in [0, 1) per image (kohya's option of that name)."""

    min_timestep: int = Field(0, ge=0)
    """Smallest timestep drawn (inclusive), kohya's `min_timestep`. With a range narrower than the schedule, a
    non-uniform distribution is squeezed into it: its x in [0, 1) becomes `min + floor(x * (max - min))`."""

    max_timestep: int | None = Field(None, gt=0)
    """Timesteps are drawn below this (exclusive), kohya's `max_timestep`; default: the schedule's length (1000)."""

    timestep_distribution: Literal["uniform", "logit_normal", "shifted"] = "uniform"
    """How timesteps are drawn in [min_timestep, max_timestep): `uniform` (SDXL's own); `logit_normal`: t/T =
    sigmoid(N(logit_mean, logit_std)), most draws in the middle (Esser et al. 2024, SD3, section 3.1);
    `shifted`: a uniform u in (0, 1) mapped through shift * u / (1 + (shift - 1) * u), towards later (noisier)
    timesteps for `timestep_shift` > 1, earlier for < 1 (SD3's resolution shift, section 5.3.2; OneTrainer's
    timestep bias). The distribution actually drawn (by the main process) is written as `<name>-timesteps.png`
    beside the loss curve."""

    logit_mean: float = 0.0
    """Mean of the normal whose sigmoid is t/T, for `timestep_distribution: logit_normal` (SD3 uses 0)."""

    logit_std: float = Field(1.0, gt=0)
    """Standard deviation of that normal, for `timestep_distribution: logit_normal` (SD3 uses 1)."""

    timestep_shift: float = Field(1.0, gt=0)
    """The shift of `timestep_distribution: shifted`: above 1 favours later (noisier) timesteps, which shape
    composition; below 1 earlier ones, which shape detail; 1 is uniform."""

    min_snr_gamma: float | None = Field(None, gt=0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023, arXiv:2303.09556): each timestep's loss weighed by
    min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v-prediction), which speeds convergence by
    down-weighting easy low-noise steps. The paper and the community use 5; unset turns it off."""

    debiased_estimation: bool = False
    """Debiased estimation (kohya's `debiased_estimation_loss`, after Yu et al. 2024, arXiv:2310.08442): weigh each
    timestep's loss by 1 / sqrt(SNR) (epsilon) or 1 / (SNR + 1) (v-prediction), SNR capped at 1000."""

    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    """The per-element loss of x = prediction - target: `l2` (x ** 2, SDXL's mean squared error), `l1` (|x|),
    `huber` (pseudo-Huber, robust to outliers: Khrapov et al. 2024, arXiv:2403.16728, as kohya implements it:
    2 * delta * (sqrt(x ** 2 + delta ** 2) - delta), about x ** 2 below delta and 2 * delta * |x| above),
    `smooth_l1` (kohya's own, not torch's: 2 * (sqrt(x ** 2 + delta ** 2) - delta)). Delta: `huber_schedule`."""

    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    """How huber's delta varies with the timestep t of T (kohya's `huber_schedule`): `constant` (huber_c),
    `exponential` (huber_c ** (t / T): 1 at t = 0, falling to huber_c at t = T), `snr` (kohya's default:
    (1 - huber_c) / (1 + sigma_t) ** 2 + huber_c with sigma_t = sqrt((1 - abar_t) / abar_t): about 1 where
    there is little noise, huber_c at pure noise)."""

    huber_c: float = Field(0.1, gt=0)
    """The delta (or its floor) of the huber and smooth-L1 losses (kohya's `huber_c`, default 0.1)."""

    huber_scale: float = Field(1.0, gt=0)
    """Multiplies huber's delta at every timestep (kohya's `huber_scale`; kohya's `snr` schedule ignores it, so
    with `huber_schedule: snr` a scale other than 1 differs from kohya)."""

    zero_terminal_snr: bool = False
    """Rescale the noise schedule's betas so the last timestep is pure noise (abar = 0; Lin et al. 2023,
    arXiv:2305.08891, section 3.1): fixes the "always mid-grey" brightness of SDXL samples. Needs
    `model.prediction_type: v_prediction` (epsilon is ill-posed at SNR 0); in-training samples then use trailing
    timestep spacing and guidance rescale 0.7, as the paper prescribes (sections 3.3-3.4)."""

    masked_loss: bool = False
    """Weigh the loss by a mask per image (kohya's `masked_loss`): white trains, black is ignored. The mask is the
    image's alpha channel for a dataset with `alpha_mask: true`, else a same-named image in its `mask_dir`; images of
    a dataset with neither (regularization images, say) train everywhere. Each mask is cut like its image and averaged
    over the 8x8 pixels of each latent cell; the loss of an image is its mean over the masked region."""

    @model_validator(mode="after")
    def _check_timestep_range(self) -> ObjectiveConfig:
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(
                f"max_timestep: must be greater than min_timestep ({self.min_timestep}), got {self.max_timestep}; "
                "timesteps are drawn from [min_timestep, max_timestep)"
            )
        # SDXL's schedule has 1000 timesteps; a model config with another length is checked when drawing.
        if self.max_timestep is not None and self.max_timestep > SDXL_TIMESTEPS:
            raise ValueError(
                f"max_timestep: SDXL's noise schedule has {SDXL_TIMESTEPS} timesteps, got {self.max_timestep}; "
                f"set it to {SDXL_TIMESTEPS} or less (timesteps are drawn below it)"
            )
        if self.max_timestep is None and self.min_timestep >= SDXL_TIMESTEPS:
            raise ValueError(
                f"min_timestep: SDXL's noise schedule has timesteps 0..{SDXL_TIMESTEPS - 1}, got {self.min_timestep}; "
                "set it lower"
            )
        return self

    @model_validator(mode="after")
    def _check_settings_apply(self) -> ObjectiveConfig:
        # A setting that does nothing in this combination is a mistake the user would not notice otherwise.
        needs = [
            ("noise_offset_random_strength", self.noise_offset > 0, "noise_offset above 0"),
            ("multires_noise_discount", self.multires_noise_iterations > 0, "multires_noise_iterations above 0"),
            ("ip_noise_gamma_random_strength", self.ip_noise_gamma > 0, "ip_noise_gamma above 0"),
            ("logit_mean", self.timestep_distribution == "logit_normal", "timestep_distribution: logit_normal"),
            ("logit_std", self.timestep_distribution == "logit_normal", "timestep_distribution: logit_normal"),
            ("timestep_shift", self.timestep_distribution == "shifted", "timestep_distribution: shifted"),
            ("huber_schedule", self.uses_huber_delta, "loss_type huber or smooth_l1"),
            ("huber_c", self.uses_huber_delta, "loss_type huber or smooth_l1"),
            ("huber_scale", self.uses_huber_delta, "loss_type huber or smooth_l1"),
        ]
        for field, applies, condition in needs:
            # Changed from its default, not merely given: a resolved config (every default written out) must load.
            if getattr(self, field) != type(self).model_fields[field].default and not applies:
                raise ValueError(f"{field}: applies only with {condition}; set that too, or remove {field}")
        if self.min_snr_gamma is not None and self.debiased_estimation:
            raise ValueError(
                "debiased_estimation: min_snr_gamma and debiased_estimation are two weightings of the same loss; pick one"
            )
        return self

    @property
    def uses_huber_delta(self) -> bool:
        return self.loss_type in ("huber", "smooth_l1")
