"""Everything a run needs before its first step, built from the config once.

The model is loaded once (`load_sdxl`) and its parts are shared by the caches, training, validation and
the sample images. Accelerate gets the parts it manages: the trained models, the optimizer, the schedule.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch

from lora_trainer.export.init_weights import load_initial_weights
from lora_trainer.adapters.wiring import attach_adapters, describe_adapters
from lora_trainer.cache.fill import FilledCaches, fill_caches
from lora_trainer.cache.text import cached_caption_encoder
from lora_trainer.config.schema import Config
from lora_trainer.data.buckets import bucket_table
from lora_trainer.fit.base_model import describe_base
from lora_trainer.fit.accelerator import start_accelerator, start_trackers
from lora_trainer.fit.compile import compile_transformer_blocks
from lora_trainer.fit.ema import make_adapter_ema
from lora_trainer.fit.eval_weights import evaluation_weights
from lora_trainer.fit.evaluate import Evaluator
from lora_trainer.fit.loader import make_dataloader
from lora_trainer.fit.long_captions import report_cut_captions
from lora_trainer.fit.optim import log_optimizer_notes, make_optimizer
from lora_trainer.fit.param_groups import freeze_unweighted_blocks, parameter_groups
from lora_trainer.fit.plan import format_plan, training_plan
from lora_trainer.fit.resume import restore_run
from lora_trainer.fit.resume_check import check_resumable, check_same_data
from lora_trainer.fit.run import Run
from lora_trainer.fit.state import SavedState, data_fingerprint, find_state, read_state
from lora_trainer.fit.samples import SampleDrawer
from lora_trainer.fit.schedules import make_lr_scheduler
from lora_trainer.model.conditioning import CaptionEncoder, live_caption_encoder
from lora_trainer.model.parts import SDXLParts, TextEncoders, load_sdxl
from lora_trainer.model.precision import weight_dtype
from lora_trainer.report.history import RunHistory

log = logging.getLogger(__name__)


def setup(config: Config, resume: str | None = None) -> Run:
    """Build the run; with `resume` (`latest` or a state folder) continue the saved run it names."""
    from accelerate.utils import set_seed

    config, accelerator = start_accelerator(config)
    saved = _saved_state(config, resume, accelerator.num_processes)
    device, dtype = accelerator.device, weight_dtype(config.training.mixed_precision)
    parts = load_sdxl(config.model)
    caches = _filled_caches(config, accelerator, parts)
    fingerprint = data_fingerprint(caches.training.items, config)
    if saved is not None:
        check_same_data(fingerprint, saved)

    set_seed(config.training.seed)  # the same on every process, so all start from identical adapters
    models = _placed_models(parts, config, device, dtype)
    trained = attach_adapters(models, config.network)
    if config.network.init_weights is not None and saved is None:
        load_initial_weights(trained, config.network.init_weights)
    freeze_unweighted_blocks(trained, config.network)  # before DDP wraps them: it must see only what trains
    if accelerator.is_main_process:
        log.info(describe_adapters(trained, config.network))
    if config.training.gradient_checkpointing:
        enable_gradient_checkpointing(models)
    if config.training.compile:
        blocks = compile_transformer_blocks(models["unet"], config.training.compile_backend)
        if accelerator.is_main_process:
            log.info("torch.compile (%s): the UNet's %d transformer blocks, compiled at their first use", config.training.compile_backend, blocks)
    optimizer = make_optimizer(parameter_groups(trained, config), config.training)
    if accelerator.is_main_process:
        log_optimizer_notes(config.training)
    *prepared, optimizer = accelerator.prepare(*trained.values(), optimizer)
    trained = dict(zip(trained, prepared))
    models.update(trained)
    ema = make_adapter_ema(trained, config.training.ema, accelerator.unwrap_model)
    dataloader = make_dataloader(caches.training, config, accelerator)

    batches_per_epoch = len(dataloader)
    plan = training_plan(config, len(dataloader.dataset), batches_per_epoch, accelerator.num_processes)
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    lr_scheduler = make_lr_scheduler(optimizer, config.training, total_steps)
    history = RunHistory(config.output.name, steps_per_epoch)
    if accelerator.is_main_process:
        log.info(format_plan(plan))
    # A resumed run hides the killed run's TensorBoard points past the state, which it is about to log again.
    start_trackers(accelerator, config, purge_step=saved.position.step + 1 if saved is not None else None)
    set_seed(config.training.seed, device_specific=True)  # each process its own dropout
    text = parts.text
    run = Run(
        config=config,
        accelerator=accelerator,
        parts=parts,
        data=caches.training,
        unet=models["unet"],
        trained=trained,
        encode_captions=_caption_encoder(
            caches, text, models["text_encoder_1"], models["text_encoder_2"], device, dtype, config.data.max_token_length
        ),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataloader=dataloader,
        total_steps=total_steps,
        epochs=plan.epochs,
        batches_per_epoch=batches_per_epoch,
        history=history,
        evaluator=_evaluator(config, accelerator, parts, caches, trained, history),
        base=describe_base(parts, with_hashes=accelerator.is_main_process, show_progress=accelerator.is_local_main_process),
        vae=None if config.data.cache_latents else parts.vae.to(device, torch.float32),  # fp32: SDXL's VAE overflows in fp16
        data_fingerprint=fingerprint,
        ema=ema,
    )
    run.evaluator.weights = partial(evaluation_weights, run)
    if saved is not None:
        restore_run(run, saved)
    return run


def _saved_state(config: Config, resume: str | None, num_processes: int) -> SavedState | None:
    """The state `--resume` names, checked against the config before any model loads."""
    if resume is None:
        return None
    saved = read_state(find_state(config.output, resume))
    check_resumable(config, saved, num_processes)
    return saved


def _filled_caches(config: Config, accelerator: Any, parts: SDXLParts) -> FilledCaches:
    """The caches, filled by the main process first (the others then find everything there), and what they hold."""
    device, dtype = accelerator.device, weight_dtype(config.training.mixed_precision)
    with accelerator.main_process_first():
        caches = fill_caches(config, parts, device, dtype, show_progress=accelerator.is_local_main_process)
    if accelerator.is_main_process:
        log.info("aspect-ratio buckets:\n%s", bucket_table(caches.training.items, config.training.seed))
        if caches.text is not None:
            log.info("text embeddings: %d reused, %d encoded", caches.text_reused, caches.text_encoded)
        report_cut_captions(config, caches, parts.text.tokenizer_1)
    return caches


def enable_gradient_checkpointing(models: dict[str, torch.nn.Module]) -> None:
    models["unet"].enable_gradient_checkpointing()
    for part in ("text_encoder_1", "text_encoder_2"):
        # Non-reentrant, so gradients reach the adapters even though the embeddings' inputs need none.
        models[part].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _placed_models(parts: SDXLParts, config: Config, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The UNet and text encoders on the device in the training precision; cached encoders stay on the CPU."""
    models = parts.lora_targets()
    for part, model in models.items():
        if part == "unet" or not config.caches_text_embeddings:
            model.to(device, dtype)
    if config.training.channels_last:
        models["unet"].to(memory_format=torch.channels_last)
    return models


def _caption_encoder(
    caches: FilledCaches,
    text: TextEncoders,
    encoder_1: torch.nn.Module,
    encoder_2: torch.nn.Module,
    device,
    dtype,
    max_token_length: int,
) -> CaptionEncoder:
    """Captions -> embeddings: read from the text cache when there is one, else encoded live by these encoders."""
    if caches.text is not None:
        return cached_caption_encoder(caches.text, device, dtype)
    return live_caption_encoder(text.tokenizer_1, text.tokenizer_2, encoder_1, encoder_2, device, max_token_length)


def _evaluator(config: Config, accelerator: Any, parts: SDXLParts, caches: FilledCaches, trained, history: RunHistory) -> Evaluator:
    """Validation and samples work on the unwrapped models: a DDP-wrapped forward on one process would hang."""
    device, dtype, text = accelerator.device, weight_dtype(config.training.mixed_precision), parts.text
    unet = accelerator.unwrap_model(parts.unet)
    drawer = SampleDrawer(config, unet, parts, device, accelerator.autocast) if config.sample.enabled and accelerator.is_main_process else None
    return Evaluator(
        config=config,
        accelerator=accelerator,
        history=history,
        trained=trained,
        unet=unet,
        noise_scheduler=parts.noise_scheduler_for(config.objective.zero_terminal_snr),
        encode_captions=_caption_encoder(
            caches, text, text.text_encoder_1, text.text_encoder_2, device, dtype, config.data.max_token_length
        ),
        validation=caches.validation,
        drawer=drawer,
    )
