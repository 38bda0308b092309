"""The weights a saved LoRA, the validation loss and the sample images are made from, which need not be the
ones that train: with `training.ema` on, the EMA of the adapters (`fit/ema.py`); with a schedule-free optimizer,
its averaged weights (its eval mode, `fit/optim.py`). The config refuses the two together."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from lora_trainer.fit.optim import optimizer_in_eval_mode
from lora_trainer.fit.run import Run


@contextmanager
def evaluation_weights(run: Run) -> Iterator[None]:
    """Inside the block the adapters hold the weights to save and evaluate; on leaving it, the live ones again."""
    with optimizer_in_eval_mode(run.optimizer), run.ema.swapped_in() if run.ema is not None else nullcontext():
        yield
