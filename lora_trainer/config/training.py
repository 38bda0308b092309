"""The `training` section: steps, batches, the optimizer and its schedule, precision and seed.

Optimizer settings live here: `weight_decay` for every optimizer, the Adam family's `adam_betas` and
`adam_epsilon` (prefixed, because "betas" also names the noise schedule and "epsilon" a prediction
type). Arguments that only one optimizer takes are to go in a typed `optimizer_args` mapping beside
them, with these as the Adam family's shortcuts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lora_trainer.config.ema import EmaConfig
from lora_trainer.config.optimizers import is_argument_value, optimizer_settings_problem
from lora_trainer.config.section import Section

# The schedule option fields, and the one schedule that uses each.
SCHEDULE_OPTIONS = {
    "lr_scheduler_num_cycles": "cosine_with_restarts",
    "lr_scheduler_power": "polynomial",
    "lr_scheduler_min_lr_ratio": "cosine",
}
# Where diffusers' polynomial schedule ends (`lr_end` of get_polynomial_decay_schedule_with_warmup, which its
# get_scheduler does not pass on).
POLYNOMIAL_END_RATE = 1e-7


class TrainingConfig(Section):
    epochs: int = Field(10, gt=0)
    """Passes over the dataset (each image counted `repeats` times)."""

    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps; when set, `epochs` is ignored."""

    batch_size: int = Field(1, gt=0)
    """Images per batch on each GPU."""

    gradient_accumulation_steps: int = Field(1, gt=0)
    """Batches whose gradients are summed before each optimizer step."""

    learning_rate: float = Field(1e-4, gt=0)
    """Learning rate of the UNet adapters (and of the text encoders unless set separately)."""

    optimizer: Literal[
        "adamw", "adamw8bit", "pagedadamw8bit", "lion", "lion8bit", "prodigy", "adafactor", "came", "adamwschedulefree",
        "sgdnesterov",
    ] = "adamw"
    """kohya's names, in any case (`AdamW8bit`, `Prodigy`, ...); state memory per trained parameter after each.
    `adamw`: torch's AdamW, 8 bytes; the default. `adamw8bit`: bitsandbytes' 8-bit AdamW, 2 bytes; the usual choice on a
    GPU with little memory. `pagedadamw8bit`: adamw8bit whose states move to CPU RAM when the GPU runs out (on a CPU it
    is adamw8bit). `lion`: Lion (Chen et al. 2023, pytorch-optimizer's), 4 bytes; wants a 3-10x smaller
    learning rate and a larger weight_decay than AdamW. `lion8bit`: bitsandbytes' Lion, 1 byte. `prodigy`: Prodigy
    (prodigyopt), 16 bytes; estimates its own step size, so set learning_rate about 1.0. `adafactor`: transformers'
    Adafactor, factored second moments, almost no memory; with the configured learning rate (kohya's usual
    `relative_step=False`), or its own with `optimizer_args: {relative_step: true}`. `came`: CAME (pytorch-optimizer),
    Adafactor with a confidence term, about 4 bytes. `adamwschedulefree`: schedule-free AdamW (schedulefree), 8 bytes;
    no decaying schedule (lr_scheduler: constant, or constant_with_warmup, whose lr_warmup_steps become its own
    warmup), and the saved LoRA holds its averaged weights. `sgdnesterov`: torch's SGD with Nesterov momentum 0.9, 4 bytes; needs a far larger learning rate."""

    optimizer_args: dict[str, bool | int | float | str | list[float]] = {}
    """Arguments only the chosen optimizer takes, by its constructor's names (kohya's `--optimizer_args`), e.g.
    `{d_coef: 2, use_bias_correction: true}` for prodigy; checked against what each optimizer takes when the config
    loads. The learning rate, `weight_decay` and (for the Adam family: adamw, adamw8bit, pagedadamw8bit, prodigy,
    adamwschedulefree) `adam_betas` and `adam_epsilon` are the fields of their own, not repeated here."""

    weight_decay: float = Field(0.01, ge=0)
    """Weight decay of the adapters, for every optimizer (decoupled from the gradient except in sgdnesterov)."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """The Adam family's two moment decay rates (beta1, beta2), as diffusers' scripts name them."""

    adam_epsilon: float = Field(1e-8, gt=0)
    """The Adam family's epsilon, added to the denominator for numerical stability."""

    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    """Learning-rate schedule over the run (diffusers' schedules)."""

    lr_warmup_steps: int | float = 0
    """Linear warmup from 0 to the learning rate: a number of optimizer steps, or a fraction of the run's steps
    between 0 and 1 (e.g. 0.05, rounded down to whole steps, as kohya's sd-scripts takes it)."""

    lr_scheduler_num_cycles: int = Field(1, gt=0)
    """`cosine_with_restarts`: cosine cycles over the run, each restarting at the full learning rate (kohya's name)."""

    lr_scheduler_power: float = Field(1.0, gt=0)
    """`polynomial`: the decay's exponent (1: linear); it ends at diffusers' fixed end rate of 1e-7 (kohya's name)."""

    lr_scheduler_min_lr_ratio: float = Field(0.0, ge=0, lt=1)
    """`cosine`: where the decay ends, as a fraction of the learning rate (0: at zero; kohya's name)."""

    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """`auto`: bf16 on a CUDA GPU that supports it, fp16 on other GPUs, full fp32 on CPU."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less than half the GPU memory, but slower. SDXL's UNet
    at 1024 px, batch 1, bf16 on an H200: peak 14.4 -> 6.8 GiB, 479 -> 1016 ms per step."""

    compile: bool = False
    """torch.compile the UNet's transformer blocks (kohya's `--torch_compile`): SDXL repeats one block 70 times,
    so compiling that block, not the whole UNet, takes seconds instead of minutes, and a new bucket shape
    recompiles one small graph (after the second shape its sizes are compiled as dynamic). The run logs how many
    graphs were compiled; each runs faster on a GPU, while on a CPU compiling rarely pays."""

    compile_backend: str = "inductor"
    """The torch.compile backend (kohya's `--dynamo_backend`): `inductor` generates kernels; `cudagraphs`,
    `aot_eager` and `eager` are torch's others."""

    channels_last: bool = False
    """Keep the UNet's convolution weights channels-last (NHWC), the layout GPU tensor cores read fastest in half
    precision; the numbers are the same."""

    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the gradient norm of the adapters to this value; 0 turns clipping off."""

    seed: int = 42
    """Seed for adapter initialisation, data order and noise."""

    ema: EmaConfig = EmaConfig()
    """An exponential moving average of the adapter weights, saved as the LoRA in their place (off by default)."""

    @field_validator("optimizer", mode="before")
    @classmethod
    def _lowercase_optimizer(cls, value: Any) -> Any:
        # kohya spells them AdamW / AdamW8bit; accept that spelling.
        return value.lower() if isinstance(value, str) else value

    @field_validator("adam_betas")
    @classmethod
    def _check_betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"must be two numbers in [0, 1), got {list(value)}")
        return value

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _check_argument_values(cls, value: Any) -> Any:
        # Before pydantic's own check, whose union type would report one line per member.
        for name, argument in value.items() if isinstance(value, dict) else ():
            if not is_argument_value(argument):
                raise ValueError(f"{name}: must be true/false, a number, a text or a list of numbers, got {argument!r}")
        return value

    @model_validator(mode="after")
    def _check_optimizer_settings(self) -> TrainingConfig:
        problem = optimizer_settings_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("lr_warmup_steps", mode="before")
    @classmethod
    def _check_warmup(cls, value: Any) -> Any:
        # Before pydantic's own check, so anything else gets one message rather than one per member of int | float.
        warmup = _warmup_value(value)
        if warmup is None:
            raise ValueError(f"must be a whole number of optimizer steps (0: none) or a fraction of the run between 0 and 1, got {value!r}")
        return warmup

    @model_validator(mode="after")
    def _check_warmup_has_a_schedule(self) -> TrainingConfig:
        warmup = self.lr_warmup_steps
        if warmup and self.lr_scheduler == "constant":
            asked = f"{warmup} warmup steps need" if isinstance(warmup, int) else f"a warmup over {warmup} of the run needs"
            raise ValueError(
                f"lr_warmup_steps: {asked} a schedule that warms up; set lr_scheduler to constant_with_warmup (or another schedule)"
            )
        return self

    @model_validator(mode="after")
    def _check_schedule_options_apply(self) -> TrainingConfig:
        for field, schedule in SCHEDULE_OPTIONS.items():
            # Only a value the user changed: a resolved config (dump_config) names every field at its default.
            changed = field in self.model_fields_set and getattr(self, field) != type(self).model_fields[field].default
            if changed and self.lr_scheduler != schedule:
                raise ValueError(
                    f"{field}: only lr_scheduler {schedule} uses it, this run's is {self.lr_scheduler}; "
                    f"set lr_scheduler to {schedule} or remove {field}"
                )
        return self

    @model_validator(mode="after")
    def _check_polynomial_ends_below_the_rate(self) -> TrainingConfig:
        if self.lr_scheduler == "polynomial" and self.learning_rate <= POLYNOMIAL_END_RATE:
            raise ValueError(
                f"learning_rate: polynomial decays to diffusers' fixed end rate {POLYNOMIAL_END_RATE:g}, so it needs a "
                f"learning rate above that, got {self.learning_rate:g}; raise learning_rate or pick another lr_scheduler"
            )
        return self


def _warmup_value(value: Any) -> int | float | None:
    """A warmup as the config keeps it: a step count as an int (10.0 too), a fraction of the run in (0, 1) as
    a float; None for anything else."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if isinstance(value, bool):
        return None
    if 0 < number < 1:
        return number
    return int(number) if number.is_integer() and number >= 0 else None
