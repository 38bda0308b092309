"""What a run writes: the LoRA file with its metadata, the resolved config, the loss curve and the timestep
histogram beside it, and at the end the history and the report."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from lora_trainer.adapters.model_weights import read_lora_weights
from lora_trainer.config.load import dump_config
from lora_trainer.config.output import OutputConfig
from lora_trainer.errors import UserError
from lora_trainer.export.lora_file import SAVE_DTYPES, save_lora_file, to_kohya_tensors
from lora_trainer.export.metadata import Progress, lora_metadata
from lora_trainer.files import write_text_atomic
from lora_trainer.fit.eval_weights import evaluation_weights
from lora_trainer.fit.run import Run
from lora_trainer.fit.state import Position, process_rng_state, prune_states, state_folder, write_state
from lora_trainer.fit.timesteps import write_timestep_histogram_of_run
from lora_trainer.report.history import history_path
from lora_trainer.report.html import write_report
from lora_trainer.report.plots import write_loss_curve

log = logging.getLogger(__name__)


def save_lora(run: Run, name: str, epoch: int) -> Path:
    """Write `<output.dir>/<name>.safetensors`, the resolved config, loss curve and timestep histogram beside it (main process only)."""
    accelerator, config = run.accelerator, run.config
    path = config.output.dir / f"{name}.safetensors"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress = Progress(steps=run.step, epoch=epoch, started_at=run.started_at)
        with evaluation_weights(run):  # written inside: the tensors may share the adapters' memory
            weights = {part: (model, read_lora_weights(model)) for part, model in _unwrapped(run).items()}
            tensors = to_kohya_tensors(weights, SAVE_DTYPES[config.output.save_dtype])
            save_lora_file(path, tensors, lora_metadata(config, run.data.items, run.data.folders, progress, run.base))
        run.history.epoch_record(epoch, run.step).lora_file = path.name
        write_text_atomic(config.output.dir / f"{config.output.name}.yaml", dump_config(config))
        write_loss_curve(config.output.dir / f"{config.output.name}-loss.png", run.history.train_losses, f"{config.output.name}: training loss")
        write_timestep_histogram_of_run(
            config.output.dir / f"{config.output.name}-timesteps.png", config.objective, run.history.timestep_counts,
            run.noise_scheduler.config.num_train_timesteps, config.output.name,
        )
        log.info("saved %s", path)
    return path


def finalize(run: Run) -> Path:
    """Save the final LoRA and write the run report beside it."""
    path = save_lora(run, run.config.output.name, run.epochs)
    if run.accelerator.is_main_process:
        if run.accelerator.device.type == "cuda":
            run.history.peak_gpu_memory_gib = torch.cuda.max_memory_allocated(run.accelerator.device) / 2**30
            log.info("peak GPU memory: %.2f GiB (torch's allocated peak)", run.history.peak_gpu_memory_gib)
        run.history.save(history_path(run.config.output.dir, run.config.output.name))
        report = write_report(run.config.output.dir, run.config.output.name)
        log.info("report: %s", report)
    return path


def _unwrapped(run: Run) -> dict[str, torch.nn.Module]:
    return {part: run.accelerator.unwrap_model(model) for part, model in run.trained.items()}


def save_state(run: Run, position: Position) -> Path | None:
    """Save the training state at `position` (every process takes part: each hands in its generators); return
    its folder, or None when the save failed and `output.state_save_failure` is `warn`."""
    accelerator, output = run.accelerator, run.config.output
    if run.last_state == position:
        return state_folder(output, position.step)
    from accelerate.utils import gather_object

    rng_states = gather_object([process_rng_state()])
    folder: Path | None = state_folder(output, position.step)
    if accelerator.is_main_process:
        try:
            write_state(
                folder, run.config, position, _unwrapped(run), run.optimizer, run.lr_scheduler, accelerator.scaler, rng_states,
                run.history.to_json(), counters={
                    "total_steps": run.total_steps, "global_batch_size": run.config.training.batch_size * accelerator.num_processes,
                    "num_processes": accelerator.num_processes, "data_fingerprint": run.data_fingerprint,
                    "started_at": run.started_at.isoformat(),
                },
                ema=run.ema,
            )
            prune_states(output)
        except UserError as error:
            if output.state_save_failure == "stop":
                raise
            log.warning("the training state of step %d was not saved, training goes on: %s", position.step, error)
            folder = None
    accelerator.wait_for_everyone()
    run.last_state = position
    return folder


def prune_saves(output: OutputConfig, kind: str) -> None:
    """Keep the newest `output.keep_saves` intermediate LoRA files of one kind: `epoch` or `step`."""
    if not output.keep_saves:
        return
    pattern = re.compile(rf"^{re.escape(output.name)}-{'step' if kind == 'step' else ''}(\d{{6}})\.safetensors$")
    numbered = sorted((int(match[1]), path) for path in output.dir.iterdir() if (match := pattern.match(path.name)))
    for _, path in numbered[: -output.keep_saves]:
        path.unlink(missing_ok=True)
