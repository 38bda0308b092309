"""The training loop: batches -> noise and timesteps -> the step's loss -> Accelerate's backward and step, and
what is due after a step or an epoch: logs, saves, training states, evaluations, a requested stop."""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_trainer.adapters.wiring import trainable_parameters
from lora_trainer.fit.max_norm import apply_max_norm
from lora_trainer.fit.optim import optimizer_train_mode
from lora_trainer.fit.run import Run
from lora_trainer.fit.save import prune_saves, save_lora, save_state
from lora_trainer.fit.state import Position
from lora_trainer.fit.step import training_step
from lora_trainer.fit.stopping import SIGNAL_NAMES, StopSignals, TrainingStopped, shared_stop_request
from lora_trainer.model.vae import non_finite_latents, scale_latents
from lora_trainer.progress import progress_bar


class NonFiniteLoss(Exception):
    def __init__(self, step: int, epoch: int, loss: float):
        super().__init__(f"loss became {loss} at step {step + 1} (epoch {epoch})")
        self.step, self.epoch, self.loss = step, epoch, loss


def fit(run: Run, stop: StopSignals | None = None) -> None:
    accelerator = run.accelerator
    stop = stop or StopSignals()
    trainable = [parameter for model in run.trained.values() for parameter in trainable_parameters(model)]
    optimizer_train_mode(run.optimizer)  # a schedule-free optimizer must be in training mode for every step
    if run.step == 0:
        run.evaluator.after_epoch(0, run.step, last=False)  # the baseline: before any step
    bar = progress_bar(total=run.total_steps, initial=run.step, desc="training", unit="step", disable=not accelerator.is_local_main_process)
    with bar, stop.graceful():
        for epoch in range(run.start_epoch, run.epochs + 1):
            for model in run.trained.values():
                model.train()  # adapter dropout is active only in training mode
            run.dataloader.set_epoch(epoch)
            batches_done = run.resume_batches if epoch == run.start_epoch else 0
            losses: list[float] = []
            for batch in run.dataloader:
                batches_done += 1
                with accelerator.accumulate(*run.trained.values()):
                    losses.append(_train_on(run, batch, epoch, trainable))
                if accelerator.sync_gradients:
                    _finish_step(run, bar, epoch, sum(losses) / len(losses))
                    losses.clear()
                    _after_step(run, stop, Position(run.step, epoch, batches_done))
                    if run.step >= run.total_steps:
                        break
            last = run.step >= run.total_steps or epoch == run.epochs
            _after_epoch(run, stop, epoch, last)
            if last:
                break


def _train_on(run: Run, batch: dict[str, Any], epoch: int, trainable: list[torch.nn.Parameter]) -> float:
    """Forward, backward and (when the accumulation is complete) the optimizer step of one batch; its loss."""
    accelerator, config = run.accelerator, run.config
    latents = batch["latents"] = _latents_of(batch, run.vae)
    draw = run.draw_noise(latents, batch["noise_seeds"])
    with accelerator.autocast():
        loss = training_step(
            run.unet, run.encode_captions, run.noise_scheduler, batch, draw.noise, draw.timesteps,
            objective=config.objective, input_noise=draw.input_noise,
        )
    loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
    if not math.isfinite(loss_value):
        _check_latents(batch)
        raise NonFiniteLoss(run.step, epoch, loss_value)
    accelerator.backward(loss)
    if accelerator.sync_gradients and config.training.max_grad_norm > 0:
        accelerator.clip_grad_norm_(trainable, config.training.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_value


def _after_step(run: Run, stop: StopSignals, position: Position) -> None:
    output = run.config.output
    run.evaluator.after_step(position.epoch, run.step)
    ends_epoch = position.batches_done == run.batches_per_epoch or run.step >= run.total_steps
    if not ends_epoch:  # at an epoch's end these wait for the epoch's own saves and evaluations
        _save_step_lora_if_due(run, position.epoch)
        if output.save_state_every_n_steps and run.step % output.save_state_every_n_steps == 0:
            save_state(run, position)
    _stop_if_asked(run, stop, position)


def _after_epoch(run: Run, stop: StopSignals, epoch: int, last: bool) -> None:
    output = run.config.output
    every = output.save_every_n_epochs
    if every and epoch % every == 0 and not last:
        save_lora(run, f"{output.name}-{epoch:06d}", epoch)
        prune_saves(output, "epoch")
    if not last:  # the final file stands for the last step
        _save_step_lora_if_due(run, epoch)
    run.evaluator.after_epoch(epoch, run.step, last)
    position = Position(run.step, epoch + 1, 0)
    state_steps_due = output.save_state_every_n_steps and run.step % output.save_state_every_n_steps == 0
    state_epochs_due = output.save_state_every_n_epochs and epoch % output.save_state_every_n_epochs == 0
    if state_steps_due or state_epochs_due or (last and output.saves_states):
        save_state(run, position)
    if not last:
        _stop_if_asked(run, stop, position)


def _save_step_lora_if_due(run: Run, epoch: int) -> None:
    output = run.config.output
    if output.save_every_n_steps and run.step % output.save_every_n_steps == 0:
        save_lora(run, f"{output.name}-step{run.step:06d}", epoch)
        prune_saves(output, "step")


def _stop_if_asked(run: Run, stop: StopSignals, position: Position) -> None:
    """After a whole step: on a Ctrl-C or SIGTERM that any process received, save the state and this step's
    LoRA and end the run (every process decides alike, from the shared request)."""
    received = shared_stop_request(stop, run.accelerator)
    if received is None:
        return
    folder = save_state(run, position)
    path = save_lora(run, f"{run.config.output.name}-step{run.step:06d}", position.epoch)
    saved = f"state saved in {folder}" if folder is not None else "the state could NOT be saved (see above)"
    raise TrainingStopped(
        received,
        f"stopped by {SIGNAL_NAMES.get(received, received)} after step {run.step} of {run.total_steps} (epoch "
        f"{min(position.epoch, run.epochs)} of {run.epochs}); {saved}; the LoRA of step {run.step} is {path}",
    )


@torch.no_grad()
def _latents_of(batch: dict[str, Any], vae: torch.nn.Module | None) -> torch.Tensor:
    if "latents" in batch:
        return batch["latents"]
    return scale_latents(vae, vae.encode(batch["pixels"].to(vae.device, torch.float32)).latent_dist.sample())


def _check_latents(batch: dict[str, Any]) -> None:
    """Name the image whose latents are NaN/inf, when the VAE encoded this batch (no latent cache; the cache
    refuses such an image when it encodes it). Called only once the loss is not finite, which NaN latents
    always make it, so the step itself checks nothing extra."""
    if "image_paths" not in batch:
        return
    finite = torch.isfinite(batch["latents"]).flatten(1).all(dim=1)
    if not finite.all():
        raise non_finite_latents(batch["image_paths"][int((~finite).nonzero()[0])])


def _finish_step(run: Run, bar: Any, epoch: int, loss: float) -> None:
    """After the optimizer stepped: the schedule, the step count, max-norm, the EMA, and the step's report."""
    # The rates this step trained at, read before the schedule moves on (Adafactor's own are known only after).
    rates = [group["lr"] for group in run.optimizer.param_groups]
    if not run.accelerator.optimizer_step_was_skipped:
        run.lr_scheduler.step()
    if None in rates:
        rates = run.lr_scheduler.get_last_lr()
    run.step += 1
    scalars: dict[str, float] = {}
    max_norm = run.config.network.scale_weight_norms
    if max_norm:
        unwrapped = {part: run.accelerator.unwrap_model(model) for part, model in run.trained.items()}
        scaled, mean_norm, largest_norm = apply_max_norm(unwrapped, max_norm)
        # kohya's TensorBoard names, so its users' dashboards read the same.
        scalars.update({"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": largest_norm})
    if run.ema is not None:
        run.ema.update(run.step)
    _report(run, bar, epoch, loss, rates, scalars)


def _report(run: Run, bar: Any, epoch: int, loss: float, learning_rates: list[float], extra: dict[str, float]) -> None:
    run.history.train_losses.append(loss)
    scalars = {"loss": loss, "epoch": epoch, **extra}
    for group, learning_rate in zip(run.optimizer.param_groups, learning_rates):
        scalars[f"lr/{group['name']}"] = learning_rate
    run.accelerator.log(scalars, step=run.step)
    bar.set_postfix(epoch=f"{epoch}/{run.epochs}", loss=f"{loss:.4f}", lr=f"{learning_rates[0]:.2e}", refresh=False)
    bar.update(1)
