"""The `training.ema` section: an exponential moving average of the adapter weights, saved in their place.

Polyak & Juditsky 1992 ("Acceleration of stochastic approximation by averaging") average the iterates of
SGD; the exponential form with the warm-up below is diffusers' `EMAModel`, which SimpleTuner and OneTrainer
offer for LoRA training too.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from lora_trainer.config.section import Section


class EmaConfig(Section):
    enabled: bool = False
    """Keep an exponential moving average (EMA) of the adapter weights and save it as the LoRA (every saved file,
    validation loss and sample image uses it; training itself goes on with the live weights). It smooths out
    the noise of the last steps, most useful at high learning rates and small batches."""

    decay: float = Field(0.999, gt=0, lt=1)
    """How slowly the average moves: after each update `ema = decay * ema + (1 - decay) * weights`, so it spans
    roughly the last 1 / (1 - decay) updates (0.999: about 1000). Short runs want a smaller decay (0.99 or 0.9)."""

    warmup: bool = True
    """Ramp the decay up from 0, as diffusers' `EMAModel.get_decay` does (without `use_ema_warmup`): the first
    update copies the weights, and an update after n earlier ones uses min(decay, (1 + n) / (10 + n)). Without
    it the average starts from the untrained adapters and lags behind for about 1 / (1 - decay) updates."""

    update_every_n_steps: int = Field(1, gt=0)
    """Update the average after every this many optimizer steps (each update counts once for the warm-up)."""

    on_cpu: bool = False
    """Keep the average in CPU memory instead of on the GPU (as OneTrainer offers): saves the GPU memory of one
    fp32 copy of the adapters, at the cost of a copy to the CPU at every update."""

    @model_validator(mode="after")
    def _check_set_only_when_enabled(self) -> EmaConfig:
        # A resolved config writes every default, so only a value other than the default is a mistake.
        if not self.enabled:
            for name in sorted(self.model_fields_set - {"enabled"}):
                if getattr(self, name) != EmaConfig.model_fields[name].default:
                    raise ValueError(f"{name}: the EMA is off, so {name} does nothing; set training.ema.enabled: true, or remove {name}")
        return self
