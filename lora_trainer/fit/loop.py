"""The training loop: batches -> noise and timesteps -> the step's loss -> Accelerate's backward and step, and
what is due after a step or an epoch: logs, saves, training states, evaluations, a requested stop."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from lora_trainer.adapters.wiring import trainable_parameters
from lora_trainer.fit.compile import compiled_graphs
from lora_trainer.fit.max_norm import apply_max_norm
from lora_trainer.fit.optim import optimizer_train_mode
from lora_trainer.fit.pending_losses import PendingLosses, PendingStep
from lora_trainer.fit.run import Run
from lora_trainer.fit.save import prune_saves, save_lora, save_state
from lora_trainer.fit.state import Position
from lora_trainer.fit.step import training_step
from lora_trainer.fit.stopping import SIGNAL_NAMES, StopSignals, TrainingStopped, shared_stop_request
from lora_trainer.fit.update_guard import UpdateGuard
from lora_trainer.model.vae import non_finite_latents, scale_latents
from lora_trainer.progress import progress_bar

log = logging.getLogger(__name__)


class NonFiniteLoss(Exception):
    def __init__(self, step: int, epoch: int, loss: float):
        super().__init__(f"loss became {loss} at step {step + 1} (epoch {epoch})")
        self.step, self.epoch, self.loss = step, epoch, loss


def fit(run: Run, stop: StopSignals | None = None) -> None:
    accelerator = run.accelerator
    stop = stop or StopSignals()
    trainable = [parameter for model in run.trained.values() for parameter in trainable_parameters(model)]
    guard = UpdateGuard(run.optimizer, accelerator.device, accelerator.scaler is not None, accelerator.num_processes)
    pending = PendingLosses(accelerator)
    optimizer_train_mode(run.optimizer)  # a schedule-free optimizer must be in training mode for every step
    if run.step == 0:
        run.evaluator.after_epoch(0, run.step, last=False)  # the baseline: before any step
    graphs_before = compiled_graphs() if run.config.training.compile else 0
    bar = progress_bar(total=run.total_steps, initial=run.step, desc="training", unit="step", disable=not accelerator.is_local_main_process)
    try:
        with bar, stop.graceful():
            _train_epochs(run, stop, bar, guard, pending, trainable)
    finally:
        if run.config.training.compile and accelerator.is_main_process:
            # each new shape or mode compiles a graph; far more than a handful means sizes keep changing
            log.info("torch.compile: %d graphs compiled during training", compiled_graphs() - graphs_before)


def _train_epochs(
    run: Run, stop: StopSignals, bar: Any, guard: UpdateGuard, pending: PendingLosses, trainable: list[torch.nn.Parameter]
) -> None:
    accelerator = run.accelerator
    for epoch in range(run.start_epoch, run.epochs + 1):
        for model in run.trained.values():
            model.train()  # adapter dropout is active only in training mode
        run.dataloader.set_epoch(epoch)
        batches_done = run.resume_batches if epoch == run.start_epoch else 0
        losses: list[torch.Tensor] = []
        latent_checks: list[tuple[list[str], torch.Tensor]] = []
        for batch in run.dataloader:
            batches_done += 1
            with accelerator.accumulate(*run.trained.values()):
                losses.append(_train_on(run, batch, trainable, guard, latent_checks))
            if accelerator.sync_gradients:
                _finish_step(run, bar, pending, PendingStep(run.step + 1, epoch, torch.stack(losses).mean(), [], {}, latent_checks))
                losses, latent_checks = [], []
                _after_step(run, bar, stop, Position(run.step, epoch, batches_done), pending)
                if run.step >= run.total_steps:
                    break
        _report_pending(run, bar, pending)  # an epoch cut short by a resume position may end between readings
        last = run.step >= run.total_steps or epoch == run.epochs
        _after_epoch(run, stop, epoch, last)
        if last:
            break


def _train_on(
    run: Run, batch: dict[str, Any], trainable: list[torch.nn.Parameter], guard: UpdateGuard,
    latent_checks: list[tuple[list[str], torch.Tensor]],
) -> torch.Tensor:
    """Forward, backward and (when the accumulation is complete) the optimizer step of one batch; its loss, on the
    device: nothing here waits for the GPU."""
    accelerator, config = run.accelerator, run.config
    latents = batch["latents"] = _latents_of(batch, run.vae)
    if "image_paths" in batch:  # encoded by the VAE just now, not checked by a cache
        latent_checks.append((batch["image_paths"], torch.isfinite(latents).flatten(1).all(dim=1)))
    draw = run.draw_noise(latents, batch["noise_seeds"])
    with accelerator.autocast():
        loss = training_step(
            run.unet, run.encode_captions, run.noise_scheduler, batch, draw.noise, draw.timesteps,
            objective=config.objective, input_noise=draw.input_noise,
        )
    guard.observe(loss)
    accelerator.backward(guard.loss_for_backward(loss))
    if accelerator.sync_gradients and config.training.max_grad_norm > 0:
        accelerator.clip_grad_norm_(trainable, config.training.max_grad_norm)
    guard.step(run.optimizer, accelerator.sync_gradients)
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _after_step(run: Run, bar: Any, stop: StopSignals, position: Position, pending: PendingLosses) -> None:
    output = run.config.output
    ends_epoch = position.batches_done == run.batches_per_epoch or run.step >= run.total_steps
    # at an epoch's end these wait for the epoch's own saves and evaluations
    saves_lora = not ends_epoch and _step_lora_due(run)
    saves_state = not ends_epoch and bool(output.save_state_every_n_steps) and run.step % output.save_state_every_n_steps == 0
    # Decided alike on every process, as the read is collective; a single process also reads for a stop request.
    reads = (
        run.step % output.log_every_n_steps == 0 or ends_epoch or saves_lora or saves_state
        or run.evaluator.draws_after_step(run.step) or (run.accelerator.num_processes == 1 and stop.received is not None)
    )
    if reads:
        _report_pending(run, bar, pending)  # nothing is saved or drawn from weights a non-finite loss came after
    run.evaluator.after_step(position.epoch, run.step)
    if saves_lora:
        _save_step_lora(run, position.epoch)
    if saves_state:
        save_state(run, position)
    if reads:
        _stop_if_asked(run, stop, position)


def _after_epoch(run: Run, stop: StopSignals, epoch: int, last: bool) -> None:
    output = run.config.output
    every = output.save_every_n_epochs
    if every and epoch % every == 0 and not last:
        save_lora(run, f"{output.name}-{epoch:06d}", epoch)
        prune_saves(output, "epoch")
    if not last and _step_lora_due(run):  # the final file stands for the last step
        _save_step_lora(run, epoch)
    run.evaluator.after_epoch(epoch, run.step, last)
    position = Position(run.step, epoch + 1, 0)
    state_steps_due = output.save_state_every_n_steps and run.step % output.save_state_every_n_steps == 0
    state_epochs_due = output.save_state_every_n_epochs and epoch % output.save_state_every_n_epochs == 0
    if state_steps_due or state_epochs_due or (last and output.saves_states):
        save_state(run, position)
    if not last:
        _stop_if_asked(run, stop, position)


def _step_lora_due(run: Run) -> bool:
    every = run.config.output.save_every_n_steps
    return bool(every) and run.step % every == 0


def _save_step_lora(run: Run, epoch: int) -> None:
    output = run.config.output
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


def _check_latents(latent_checks: list[tuple[list[str], torch.Tensor]]) -> None:
    """Name the image whose latents are NaN/inf, when the VAE encoded the step's batches (no latent cache; the
    cache refuses such an image when it encodes it). Called only once the loss is not finite, which NaN latents
    always make it, so the step itself reads nothing back."""
    for paths, finite in latent_checks:
        if not finite.all():
            raise non_finite_latents(paths[int((~finite).nonzero()[0])])


def _finish_step(run: Run, bar: Any, pending: PendingLosses, step: PendingStep) -> None:
    """After the optimizer stepped: the schedule, the step count, max-norm, the EMA; the step's report waits for
    the next reading of the losses."""
    # The rates this step trained at, read before the schedule moves on (Adafactor's own are known only after).
    rates = [group["lr"] for group in run.optimizer.param_groups]
    if not run.accelerator.optimizer_step_was_skipped:
        run.lr_scheduler.step()
    if None in rates:
        rates = run.lr_scheduler.get_last_lr()
    run.step += 1
    step.learning_rates = rates
    max_norm = run.config.network.scale_weight_norms
    if max_norm:
        unwrapped = {part: run.accelerator.unwrap_model(model) for part, model in run.trained.items()}
        scaled, mean_norm, largest_norm = apply_max_norm(unwrapped, max_norm)
        # kohya's TensorBoard names, so its users' dashboards read the same.
        step.scalars.update({"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": largest_norm})
    if run.ema is not None:
        run.ema.update(run.step)
    pending.add(step)
    bar.update(1)


def _report_pending(run: Run, bar: Any, pending: PendingLosses) -> None:
    """Report every step whose loss was not read yet; at a non-finite one, stop with the step before it as the
    last good one (the update guard kept the weights there)."""
    for step, loss in pending.read():
        if not math.isfinite(loss):
            run.step = step.step - 1
            _check_latents(step.latent_checks)
            raise NonFiniteLoss(run.step, step.epoch, loss)
        _report(run, bar, step, loss)


def _report(run: Run, bar: Any, step: PendingStep, loss: float) -> None:
    run.history.train_losses.append(loss)
    scalars = {"loss": loss, "epoch": step.epoch, **step.scalars}
    for group, learning_rate in zip(run.optimizer.param_groups, step.learning_rates):
        scalars[f"lr/{group['name']}"] = learning_rate
    run.accelerator.log(scalars, step=step.step)
    bar.set_postfix(epoch=f"{step.epoch}/{run.epochs}", loss=f"{loss:.4f}", lr=f"{step.learning_rates[0]:.2e}", refresh=False)
