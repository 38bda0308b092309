"""`lora-train plan CONFIG`: what `train` would do with a config, shown before any model weight loads.

Every image's bucket and fate, the buckets' batches, the steps and learning rates (`fit.plan`, as `fit.setup`
prints them), the files the run writes and an estimate of its peak GPU memory. The images are read up to
their headers and the model up to its configs, so a plan of a 10,000-image SDXL run takes seconds and no GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

from lora_trainer.config.schema import Config
from lora_trainer.fit.data_plan import check_trainable, format_bucket_summary, format_image_table, plan_data
from lora_trainer.fit.memory_advice import memory_warning
from lora_trainer.fit.memory_estimate import estimate_peak_memory, format_memory_estimate, memory_settings
from lora_trainer.fit.model_counts import count_model
from lora_trainer.fit.plan import format_plan, training_plan
from lora_trainer.fit.planned_files import format_planned_files, planned_files


def plan_blocks(config: Config, gpu_memory: float | None = None, processes: int = 1) -> Iterator[str]:
    """The plan, one block of text at a time, so the image table shows before a later block fails (no usable image)."""
    data = plan_data(config, processes)
    yield format_image_table(data, config.datasets)
    if data.stops_on_bad_files:
        yield (
            f"warning: data.on_bad_image is error, so train stops before its first step on the {len(data.bad)} dropped "
            "files above; fix or remove them, or set data.on_bad_image: skip to train without them"
        )
    check_trainable(data)
    yield format_bucket_summary(data, config.training.batch_size * processes)
    plan = training_plan(config, data.items_per_epoch, data.batches_per_epoch, processes)
    yield format_plan(plan)
    yield format_planned_files(planned_files(config, plan), config.output.dir) + _earlier_run(config)
    counts = count_model(config.model, config.network)
    settings = memory_settings(config, processes)
    yield format_memory_estimate(estimate_peak_memory(counts, settings), counts.source)
    if gpu_memory is not None:
        warning = memory_warning(counts, settings, gpu_memory)
        if warning:
            yield warning


def _earlier_run(config: Config) -> str:
    """A note when `train` would refuse the folder as it is: it holds a run of the same name."""
    from lora_trainer.fit.output_folder import run_files

    output = config.output
    if not output.dir.is_dir() or not run_files(output):
        return ""
    return (
        f"\n  note: {output.dir} already holds a run named {output.name}; train needs --resume latest to continue it "
        "or --overwrite to replace it"
    )
