"""Continuing a run from a saved state: adapters and their EMA, optimizer, schedule, scaler, generators, history,
position.

The config was checked against the state before anything loaded (`resume_check`); what may differ is
said here in one line each: a new step budget (the schedule is recomputed over it) and another number
of processes (the same global batch, split differently).
"""

from __future__ import annotations

import logging

from lora_trainer.fit.run import Run
from lora_trainer.fit.schedules import learning_rate_at
from lora_trainer.fit.state import SavedState, load_adapter_tensors, load_ema_state, load_optimizer_state, restore_rng_state
from lora_trainer.report.history import RunHistory

log = logging.getLogger(__name__)


def restore_run(run: Run, saved: SavedState) -> None:
    accelerator, position = run.accelerator, saved.position
    load_adapter_tensors({part: accelerator.unwrap_model(model) for part, model in run.trained.items()}, saved.folder)
    load_optimizer_state(run.optimizer, saved)
    if run.ema is not None:
        load_ema_state(run.ema, saved)
    run.lr_scheduler.load_state_dict(saved.values["lr_scheduler"])
    _rates_from_schedule(run)
    if accelerator.scaler is not None and saved.values.get("grad_scaler"):
        accelerator.scaler.load_state_dict(saved.values["grad_scaler"])
    if not restore_rng_state(saved, accelerator.process_index, run.config.training.seed) and accelerator.is_main_process:
        log.info("the state was saved by %d processes: the new ones start fresh random generators (dropout)", saved.num_processes)
    run.history = run.evaluator.history = RunHistory.load(saved.folder / "history.json")
    run.step, run.start_epoch, run.resume_batches, run.last_state = position.step, position.epoch, position.batches_done, position
    run.dataloader.batch_sampler.resume_at(position.epoch, position.batches_done)
    if accelerator.is_main_process:
        log.info("resuming %s at step %d of %d (epoch %d, %d batches into it)", saved.folder, position.step, run.total_steps,
                 min(position.epoch, run.epochs), position.batches_done)
        if saved.total_steps != run.total_steps:
            log.info(schedule_change(run, saved))


def _rates_from_schedule(run: Run) -> None:
    """The optimizer's state holds the saved run's learning rates; a new budget recomputes the schedule, so the
    next step must train at the new schedule's rate, not at the one the state remembers."""
    if any(group.get("lr") is None for group in run.optimizer.param_groups):  # Adafactor sets its own rates
        return
    for group, base_rate, factor in zip(run.optimizer.param_groups, run.lr_scheduler.base_lrs, run.lr_scheduler.lr_lambdas):
        group["lr"] = base_rate * factor(run.lr_scheduler.last_epoch)


def schedule_change(run: Run, saved: SavedState) -> str:
    training, step = run.config.training, saved.position.step + 1
    line = f"the run now has {run.total_steps} steps instead of {saved.total_steps}: the learning-rate schedule is recomputed over {run.total_steps}"
    before, after = learning_rate_at(training, saved.total_steps, step), learning_rate_at(training, run.total_steps, step)
    if before == after:
        return f"{line}; the rate at step {step} stays {after:.2e}"
    return f"{line}, so the rate at step {step} is {after:.2e} instead of {before:.2e}"
