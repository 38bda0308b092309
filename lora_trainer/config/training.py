"""The `training` section: steps, batches, the optimizer and its schedule, precision and seed.

Optimizer settings live here: `weight_decay` for every optimizer, the Adam family's `adam_betas` and
`adam_epsilon` (prefixed, because "betas" also names the noise schedule and "epsilon" a prediction
type). Arguments that only one optimizer takes are to go in a typed `optimizer_args` mapping beside
them, with these as the Adam family's shortcuts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lora_trainer.config.section import Section


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

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw` (torch) or `adamw8bit` (bitsandbytes: 8-bit optimizer states, a quarter of AdamW's state memory)."""

    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay of the adapters (AdamW's; every optimizer of the field takes one)."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """The Adam family's two moment decay rates (beta1, beta2), as diffusers' scripts name them."""

    adam_epsilon: float = Field(1e-8, gt=0)
    """The Adam family's epsilon, added to the denominator for numerical stability."""

    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    """Learning-rate schedule over the run (diffusers' schedules)."""

    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from 0 to the learning rate."""

    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """`auto`: bf16 on a CUDA GPU that supports it, fp16 on other GPUs, full fp32 on CPU."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less than half the GPU memory, but slower. SDXL's UNet
    at 1024 px, batch 1, bf16 on an H200: peak 14.4 -> 6.8 GiB, 479 -> 1016 ms per step."""

    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the gradient norm of the adapters to this value; 0 turns clipping off."""

    seed: int = 42
    """Seed for adapter initialisation, data order and noise."""

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

    @model_validator(mode="after")
    def _check_warmup_has_a_schedule(self) -> TrainingConfig:
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError(
                f"lr_warmup_steps: {self.lr_warmup_steps} warmup steps need a schedule that warms up; "
                "set lr_scheduler to constant_with_warmup (or another schedule)"
            )
        return self

