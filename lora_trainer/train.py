"""`lora-train train`: setup -> fit -> finalize.

setup builds everything from the config (cache, models, adapters, optimizer) and hands Accelerate the
parts it manages; fit is the loop; finalize writes the LoRA and the resolved config.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lora_trainer.conditioning import CaptionEncoder, live_caption_encoder
from lora_trainer.config import Config, NetworkConfig, dump_config
from lora_trainer.data.cache import scale_latents
from lora_trainer.data.pipeline import TrainingData, bucket_table, prepare_training_data
from lora_trainer.data.text_cache import cache_caption_embeddings, cached_caption_encoder
from lora_trainer.errors import UserError
from lora_trainer.evaluation import evaluate_epoch, sample_by_step
from lora_trainer.history import RunHistory, history_path
from lora_trainer.files import write_text_atomic
from lora_trainer.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, attach_lora, lora_layers, lora_parameters, read_lora_weights
from lora_trainer.lora_io import SAVE_DTYPES, save_lora_file, to_kohya_tensors
from lora_trainer.metadata import Progress, lora_metadata
from lora_trainer.models import TextEncoders, load_noise_scheduler, load_text_encoders, load_unet, load_vae
from lora_trainer.objective import draw_noise_and_timesteps
from lora_trainer.optim import make_lr_scheduler, make_optimizer
from lora_trainer.plots import write_loss_curve
from lora_trainer.precision import resolve_mixed_precision, weight_dtype
from lora_trainer.progress import progress_bar
from lora_trainer.report import write_report
from lora_trainer.step import training_step
from lora_trainer.training_samples import TrainingSampler
from lora_trainer.validation import ValidationSet, prepare_validation

log = logging.getLogger(__name__)


class NonFiniteLoss(Exception):
    def __init__(self, step: int, epoch: int, loss: float):
        super().__init__(f"loss became {loss} at step {step + 1} (epoch {epoch})")
        self.step, self.epoch, self.loss = step, epoch, loss


@dataclass
class Run:
    """What setup builds and fit and finalize use."""

    config: Config
    accelerator: Any
    data: TrainingData
    unet: torch.nn.Module
    encode_captions: CaptionEncoder
    noise_scheduler: Any
    trained: dict[str, torch.nn.Module]  # part name -> prepared model whose adapters train
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    total_steps: int
    epochs: int
    text: TextEncoders  # the unwrapped text encoders and tokenizers, for sampling and validation
    evaluation_encoder: CaptionEncoder  # captions -> embeddings through unwrapped (or cached) encoders
    history: RunHistory
    vae: torch.nn.Module | None = None  # set when images are encoded every step instead of cached
    validation: ValidationSet | None = None
    sampler: TrainingSampler | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    step: int = 0


def train(config: Config) -> Path:
    """Train a LoRA as configured; return the path of the final `.safetensors`."""
    run = setup(config)
    try:
        try:
            fit(run)
        except NonFiniteLoss as stop:
            raise UserError(_non_finite_message(run, stop)) from None
        except torch.cuda.OutOfMemoryError:
            raise UserError(
                f"out of GPU memory at step {run.step + 1}: set training.gradient_checkpointing: true, "
                "training.optimizer: adamw8bit, a smaller training.batch_size (with gradient_accumulation_steps), "
                "or freeze the text encoders"
            ) from None
        return finalize(run)
    finally:
        run.accelerator.end_training()


def setup(config: Config) -> Run:
    from accelerate.utils import set_seed

    config, accelerator = _start_accelerator(config)
    device, dtype = accelerator.device, weight_dtype(config.training.mixed_precision)
    show_progress = accelerator.is_local_main_process
    with accelerator.main_process_first():
        data = prepare_training_data(config, device, lambda: load_vae(config.model), show_progress)
        validation = prepare_validation(config, data, device, show_progress)
    if accelerator.is_main_process:
        log.info("aspect-ratio buckets:\n%s", bucket_table(data.items, config.training.seed))

    set_seed(config.training.seed)  # the same on every process, so all start from identical adapters
    text = load_text_encoders(config.model)
    parts = {
        "unet": load_unet(config.model).to(device, dtype),
        "text_encoder_1": text.text_encoder_1.to(device, dtype),
        "text_encoder_2": text.text_encoder_2.to(device, dtype),
    }
    trained = _attach_adapters(parts, config.network)
    if config.training.gradient_checkpointing:
        _enable_gradient_checkpointing(parts)

    optimizer = make_optimizer(_parameter_groups(trained, config), config.training)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    trained = dict(zip(trained, prepared[: len(trained)]))
    optimizer = prepared[-1]
    parts.update(trained)
    dataloader = _make_dataloader(data, config, accelerator)

    steps_per_epoch = math.ceil(len(dataloader) / config.training.gradient_accumulation_steps)
    total_steps = config.training.max_steps or config.training.epochs * steps_per_epoch
    lr_scheduler = accelerator.prepare(make_lr_scheduler(optimizer, config.training, total_steps, accelerator.num_processes))
    encode_captions = live_caption_encoder(text.tokenizer_1, text.tokenizer_2, parts["text_encoder_1"], parts["text_encoder_2"], device)
    evaluation_encoder = live_caption_encoder(text.tokenizer_1, text.tokenizer_2, text.text_encoder_1, text.text_encoder_2, device)
    if config.caches_text_embeddings:
        extra = validation.captions if validation is not None else ()
        with accelerator.main_process_first():
            cache, reused, encoded = cache_caption_embeddings(config, data.records, text, device, dtype, show_progress, extra)
        log.info("text embeddings: %d reused, %d encoded", reused, encoded)
        encode_captions = evaluation_encoder = cached_caption_encoder(cache, device, dtype)
        # Their outputs now come from disk: the encoders can leave the GPU.
        text.text_encoder_1.to("cpu")
        text.text_encoder_2.to("cpu")

    accelerator.init_trackers(config.output.name, config=_tracker_hyperparameters(config))
    set_seed(config.training.seed, device_specific=True)  # different noise on each process
    return Run(
        config=config,
        accelerator=accelerator,
        data=data,
        unet=parts["unet"],
        encode_captions=encode_captions,
        noise_scheduler=load_noise_scheduler(config.model),
        trained=trained,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataloader=dataloader,
        total_steps=total_steps,
        epochs=math.ceil(total_steps / steps_per_epoch),
        text=text,
        evaluation_encoder=evaluation_encoder,
        history=RunHistory(config.output.name, steps_per_epoch),
        vae=None if config.data.cache_latents else _frozen_vae(config, device),
        validation=validation,
        sampler=_make_sampler(config, accelerator, parts["unet"], text),
    )


def _make_sampler(config: Config, accelerator: Any, unet: torch.nn.Module, text: TextEncoders) -> TrainingSampler | None:
    if not config.sample.enabled or not accelerator.is_main_process:
        return None
    return TrainingSampler(config, accelerator.unwrap_model(unet), text, accelerator.device, accelerator.autocast)


def _frozen_vae(config: Config, device: torch.device) -> torch.nn.Module:
    """The VAE for encoding images every step (no latent cache), in fp32 because SDXL's VAE overflows in fp16."""
    vae = load_vae(config.model).to(device, torch.float32)
    vae.requires_grad_(False)
    return vae.eval()


def _start_accelerator(config: Config) -> tuple[Config, Any]:
    """The Accelerator for this run, and the config with `mixed_precision: auto` resolved."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    if not is_tensorboard_available():
        raise UserError("TensorBoard is not installed, so no training curves would be logged; pip install tensorboard")
    mixed_precision = resolve_mixed_precision(config.training.mixed_precision)
    config = config.model_copy(update={"training": config.training.model_copy(update={"mixed_precision": mixed_precision})})
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(config.output.dir), logging_dir=str(config.output.dir / "logs")),
    )
    return config, accelerator


def _attach_adapters(parts: dict[str, torch.nn.Module], network: NetworkConfig) -> dict[str, torch.nn.Module]:
    """Attach LoRA to the parts switched on in the config; return those parts by name."""
    switched_on = {"unet": network.train_unet, "text_encoder_1": network.train_text_encoder_1, "text_encoder_2": network.train_text_encoder_2}
    trained = {part: parts[part] for part, on in switched_on.items() if on}
    for part, model in trained.items():
        targets = UNET_TARGETS if part == "unet" else TEXT_ENCODER_TARGETS
        attach_lora(model, targets, network.rank, network.alpha, network.dropout)
    if "text_encoder_1" in trained:
        _freeze_last_layer_adapters(trained["text_encoder_1"])
    return trained


def fit(run: Run) -> None:
    accelerator, config = run.accelerator, run.config
    trainable = [parameter for model in run.trained.values() for parameter in trainable_parameters(model)]
    window: list[float] = []
    if run.step == 0:
        evaluate_epoch(run, epoch=0, last=False)  # the baseline: before any step
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
                    sample_by_step(run, epoch)
                    if run.step >= run.total_steps:
                        break
            last = run.step >= run.total_steps or epoch == run.epochs
            every = config.output.save_every_n_epochs
            if every and epoch % every == 0 and not last:
                save_lora(run, f"{config.output.name}-{epoch:06d}", epoch)
            evaluate_epoch(run, epoch, last)
            if last:
                break


@torch.no_grad()
def _latents_of(batch: dict[str, Any], vae: torch.nn.Module | None) -> torch.Tensor:
    if "latents" in batch:
        return batch["latents"]
    return scale_latents(vae, vae.encode(batch["pixels"].to(vae.device, torch.float32)).latent_dist.sample())


def finalize(run: Run) -> Path:
    """Save the final LoRA and write the run report beside it."""
    path = save_lora(run, run.config.output.name, run.epochs)
    if run.accelerator.is_main_process:
        run.history.save(history_path(run.config.output.dir, run.config.output.name))
        report = write_report(run.config.output.dir, run.config.output.name)
        log.info("report: %s", report)
    return path


def save_lora(run: Run, name: str, epoch: int) -> Path:
    """Write `<output.dir>/<name>.safetensors`, the resolved config and the loss curve beside it (main process only)."""
    accelerator, config = run.accelerator, run.config
    path = config.output.dir / f"{name}.safetensors"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = {part: (model, read_lora_weights(model)) for part, model in _unwrapped(run).items()}
        tensors = to_kohya_tensors(weights, SAVE_DTYPES[config.output.save_dtype])
        metadata = lora_metadata(config, run.data, Progress(steps=run.step, epoch=epoch, started_at=run.started_at))
        save_lora_file(path, tensors, metadata)
        run.history.epoch_record(epoch, run.step).lora_file = path.name
        write_text_atomic(config.output.dir / f"{config.output.name}.yaml", dump_config(config))
        write_loss_curve(config.output.dir / f"{config.output.name}-loss.png", run.history.train_losses, f"{config.output.name}: training loss")
        log.info("saved %s", path)
    return path


def _unwrapped(run: Run) -> dict[str, torch.nn.Module]:
    return {part: run.accelerator.unwrap_model(model) for part, model in run.trained.items()}


def _report(run: Run, bar: Any, epoch: int, loss: float) -> None:
    learning_rates = run.lr_scheduler.get_last_lr()
    run.history.train_losses.append(loss)
    scalars = {"loss": loss, "epoch": epoch}
    for group, learning_rate in zip(run.optimizer.param_groups, learning_rates):
        scalars[f"lr/{group['name']}"] = learning_rate
    run.accelerator.log(scalars, step=run.step)
    bar.set_postfix(epoch=f"{epoch}/{run.epochs}", loss=f"{loss:.4f}", lr=f"{learning_rates[0]:.2e}", refresh=False)
    bar.update(1)


def _parameter_groups(trained: dict[str, torch.nn.Module], config: Config) -> list[dict[str, Any]]:
    text_encoder_lr = config.network.text_encoder_learning_rate or config.training.learning_rate
    groups = []
    if "unet" in trained:
        groups.append({"name": "unet", "params": trainable_parameters(trained["unet"]), "lr": config.training.learning_rate})
    text_parameters = [p for part, model in trained.items() if part != "unet" for p in trainable_parameters(model)]
    if text_parameters:
        groups.append({"name": "text_encoder", "params": text_parameters, "lr": text_encoder_lr})
    return groups


def _make_dataloader(data: TrainingData, config: Config, accelerator: Any) -> Any:
    """Batches of one bucket each; this process's share of them, already on its device."""
    from accelerate.data_loader import prepare_data_loader

    from lora_trainer.data.dataset import TrainingDataset, collate, epoch_items
    from lora_trainer.data.sampler import BucketBatchSampler

    seed = config.training.seed
    dataset = TrainingDataset(epoch_items(data.items, seed), config.datasets, seed, config.data.alpha_background)
    sampler = BucketBatchSampler(
        dataset.buckets(), config.training.batch_size, seed, accelerator.num_processes, accelerator.process_index
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.data.workers,
        persistent_workers=config.data.workers > 0,
    )
    # Our sampler already splits batches between processes; Accelerate only tracks the loader's end (for
    # gradient accumulation) and moves batches to the device.
    return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0, put_on_device=True)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [parameter for parameter in lora_parameters(model) if parameter.requires_grad]


def _freeze_last_layer_adapters(text_encoder_1: torch.nn.Module) -> None:
    """SDXL reads CLIP-L's penultimate layer, so the last layer's adapters can never get a gradient.

    They stay in the file (kohya writes them too, as zeros) but do not train: an optimizer has nothing
    to do there, and multi-GPU DDP fails on trainable parameters that no step uses.
    """
    last_layer = f"layers.{text_encoder_1.config.num_hidden_layers - 1}."
    for name, layer in lora_layers(text_encoder_1).items():
        if last_layer in name:
            for parameter in layer.parameters():
                if parameter.requires_grad:
                    parameter.requires_grad_(False)


def _enable_gradient_checkpointing(parts: dict[str, torch.nn.Module]) -> None:
    parts["unet"].enable_gradient_checkpointing()
    for part in ("text_encoder_1", "text_encoder_2"):
        # Non-reentrant, so gradients reach the adapters even though the embeddings' inputs need none.
        parts[part].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _tracker_hyperparameters(config: Config) -> dict[str, Any]:
    """The config flattened to `section.field` scalars, as TensorBoard's hparams accept."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                visit(f"{prefix}.{key}" if prefix else key, child)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for index, child in enumerate(value):
                visit(f"{prefix}.{index}", child)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", config.model_dump(mode="json"))
    return flat


def _non_finite_message(run: Run, stop: NonFiniteLoss) -> str:
    advice = "lower training.learning_rate, or use training.mixed_precision bf16 instead of fp16"
    if run.step == 0:
        return f"training stopped: {stop}; no step had finished, so nothing was saved; {advice}"
    path = save_lora(run, f"{run.config.output.name}-step{run.step:06d}", stop.epoch)
    return f"training stopped: {stop}; saved the LoRA of step {run.step}, the last good one, to {path}; {advice}"
