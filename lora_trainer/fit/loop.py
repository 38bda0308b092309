"""The training loop: batches -> noise and timesteps -> the step's loss -> Accelerate's backward and step."""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_trainer.adapters.wiring import trainable_parameters
from lora_trainer.fit.objective import draw_noise_and_timesteps
from lora_trainer.fit.run import Run
from lora_trainer.fit.save import save_lora
from lora_trainer.fit.step import training_step
from lora_trainer.model.vae import non_finite_latents, scale_latents
from lora_trainer.progress import progress_bar


class NonFiniteLoss(Exception):
    def __init__(self, step: int, epoch: int, loss: float):
        super().__init__(f"loss became {loss} at step {step + 1} (epoch {epoch})")
        self.step, self.epoch, self.loss = step, epoch, loss


def fit(run: Run) -> None:
    accelerator, config = run.accelerator, run.config
    trainable = [parameter for model in run.trained.values() for parameter in trainable_parameters(model)]
    window: list[float] = []
    if run.step == 0:
        run.evaluator.after_epoch(0, run.step, last=False)  # the baseline: before any step
    with progress_bar(total=run.total_steps, desc="training", unit="step", disable=not accelerator.is_local_main_process) as bar:
        for epoch in range(1, run.epochs + 1):
            for model in run.trained.values():
                model.train()  # adapter dropout is active only in training mode
            run.dataloader.set_epoch(epoch)
            for batch in run.dataloader:
                with accelerator.accumulate(*run.trained.values()):
                    latents = batch["latents"] = _latents_of(batch, run.vae)
                    noise, timesteps = draw_noise_and_timesteps(latents, run.noise_scheduler.config.num_train_timesteps)
                    with accelerator.autocast():
                        loss = training_step(run.unet, run.encode_captions, run.noise_scheduler, batch, noise, timesteps)
                    loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
                    if not math.isfinite(loss_value):
                        _check_latents(batch)
                        raise NonFiniteLoss(run.step, epoch, loss_value)
                    window.append(loss_value)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.training.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, config.training.max_grad_norm)
                    run.optimizer.step()
                    run.lr_scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    run.step += 1
                    _report(run, bar, epoch, sum(window) / len(window))
                    window.clear()
                    run.evaluator.after_step(epoch, run.step)
                    if run.step >= run.total_steps:
                        break
            last = run.step >= run.total_steps or epoch == run.epochs
            every = config.output.save_every_n_epochs
            if every and epoch % every == 0 and not last:
                save_lora(run, f"{config.output.name}-{epoch:06d}", epoch)
            run.evaluator.after_epoch(epoch, run.step, last)
            if last:
                break


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


def _report(run: Run, bar: Any, epoch: int, loss: float) -> None:
    learning_rates = run.lr_scheduler.get_last_lr()
    run.history.train_losses.append(loss)
    scalars = {"loss": loss, "epoch": epoch}
    for group, learning_rate in zip(run.optimizer.param_groups, learning_rates):
        scalars[f"lr/{group['name']}"] = learning_rate
    run.accelerator.log(scalars, step=run.step)
    bar.set_postfix(epoch=f"{epoch}/{run.epochs}", loss=f"{loss:.4f}", lr=f"{learning_rates[0]:.2e}", refresh=False)
    bar.update(1)
