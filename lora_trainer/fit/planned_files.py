"""The files a run will write, named as the code that writes them names them, from the config and the plan.

`fit.loop` saves `<name>-<epoch>.safetensors` after every `save_every_n_epochs` epochs and
`<name>-step<step>.safetensors` after every `save_every_n_steps` steps, except at the end, where the final
`<name>.safetensors` stands for the last step; `fit.save` writes the resolved config, the loss curve and the
timestep histogram with each, the history and the report at the end; `fit.state` the training states;
`fit.samples` the sample images of each round `fit.evaluate` draws; `cache` the latent and text caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_trainer.config.schema import Config
from lora_trainer.fit.output_folder import LOCK_NAME
from lora_trainer.fit.plan import TrainingPlan
from lora_trainer.fit.samples import SAMPLES_FOLDER
from lora_trainer.fit.state import STATES_FOLDER
from lora_trainer.report.history import history_path


@dataclass(frozen=True)
class RunFile:
    label: str  # what it is
    names: tuple[str, ...]  # relative to output.dir, or absolute outside it
    note: str = ""  # when, how many, what prunes it


def planned_files(config: Config, plan: TrainingPlan) -> list[RunFile]:
    """Every file and folder a run of `config` writes, in the order a user looks for them."""
    output, name = config.output, config.output.name
    files = [RunFile("final LoRA", (f"{name}.safetensors",), f"{output.save_dtype}, after step {plan.total_steps}")]
    epochs = epoch_saves(config, plan)
    if epochs:
        files.append(RunFile(
            "LoRAs by epoch", tuple(f"{name}-{epoch:06d}.safetensors" for epoch in epochs),
            _series_note(len(epochs), f"every {output.save_every_n_epochs} epochs (output.save_every_n_epochs)", output.keep_saves),
        ))
    steps = step_saves(config, plan)
    if steps:
        files.append(RunFile(
            "LoRAs by step", tuple(f"{name}-step{step:06d}.safetensors" for step in steps),
            _series_note(len(steps), f"every {output.save_every_n_steps} steps (output.save_every_n_steps)", output.keep_saves),
        ))
    files.append(RunFile(
        "with each LoRA", (f"{name}.yaml", f"{name}-loss.png", f"{name}-timesteps.png"),
        "the resolved config, the loss curve and the timestep histogram, rewritten at each save",
    ))
    files.append(RunFile("history", (history_path(Path("."), name).name,), "losses, evaluations and samples, after every epoch"))
    report = [f"{name}-report.html", f"{name}-report-loss.png"] + ([f"{name}-report-grid.png"] if config.sample.enabled else [])
    files.append(RunFile("report", tuple(report), "at the end (lora-train report remakes it)"))
    samples = sample_files(config, plan)
    if samples:
        files.append(RunFile("sample images", tuple(samples), _samples_note(config, plan, len(samples))))
    states = state_steps(config, plan)
    if states:
        files.append(RunFile(
            "training states", tuple(f"{STATES_FOLDER}/{name}-step{step:06d}/" for step in states),
            f"{len(states)} states for --resume, the newest {output.keep_states} kept (output.keep_states)",
        ))
    files.append(RunFile("TensorBoard", (f"logs/{name}/",), "tensorboard --logdir logs"))
    files.extend(_caches(config))
    files.append(RunFile(
        "cut captions", (f"{name}-cut-captions.txt",), f"only if a caption is longer than {config.data.max_token_length} tokens",
    ))
    files.append(RunFile("lock", (LOCK_NAME,), "while the run is live"))
    files.append(RunFile("on Ctrl-C or SIGTERM", (f"{name}-step<N>.safetensors", f"{STATES_FOLDER}/{name}-step<N>/"), "of the step it stops after"))
    return files


def epoch_saves(config: Config, plan: TrainingPlan) -> list[int]:
    """The epochs after which a numbered LoRA is saved: every `save_every_n_epochs`, the last one aside."""
    every = config.output.save_every_n_epochs
    return list(range(every, plan.epochs, every)) if every else []


def step_saves(config: Config, plan: TrainingPlan) -> list[int]:
    """The steps after which a step LoRA is saved: every `save_every_n_steps`, the last step aside."""
    every = config.output.save_every_n_steps
    return list(range(every, plan.total_steps, every)) if every else []


def state_steps(config: Config, plan: TrainingPlan) -> list[int]:
    """The steps whose training state is saved: every `save_state_every_n_steps`, at the end of every
    `save_state_every_n_epochs` epochs, and at the end of a run that saves states at all."""
    output = config.output
    if not output.saves_states:
        return []
    steps = {plan.total_steps}
    if output.save_state_every_n_steps:
        steps.update(range(output.save_state_every_n_steps, plan.total_steps + 1, output.save_state_every_n_steps))
    if output.save_state_every_n_epochs:
        every = output.save_state_every_n_epochs
        steps.update(min(epoch * plan.steps_per_epoch, plan.total_steps) for epoch in range(every, plan.epochs + 1, every))
    return sorted(steps)


def sample_rounds(config: Config, plan: TrainingPlan) -> tuple[list[int], list[int]]:
    """(epochs, steps) after which the prompts are drawn: epoch 0 is before training."""
    sample = config.sample
    if not sample.enabled:
        return [], []
    epochs = [0] if sample.before_training else []
    every = sample.every_n_epochs
    epochs += [epoch for epoch in range(1, plan.epochs + 1) if epoch == plan.epochs or (every and epoch % every == 0)]
    steps = list(range(sample.every_n_steps, plan.total_steps + 1, sample.every_n_steps)) if sample.every_n_steps else []
    return epochs, steps


def sample_files(config: Config, plan: TrainingPlan) -> list[str]:
    from lora_trainer.sampling.generate import drawings, slug

    epochs, steps = sample_rounds(config, plan)
    if not epochs and not steps:
        return []
    images = drawings(config.sample.prompt_specs(config.data.resolution))
    labels = [f"e{epoch:06d}" for epoch in epochs] + [f"step{step:06d}" for step in steps]
    return [f"{SAMPLES_FOLDER}/{label}-{image.index:02d}-{slug(image.spec.prompt)}.png" for label in labels for image in images]


def _samples_note(config: Config, plan: TrainingPlan, count: int) -> str:
    epochs, steps = sample_rounds(config, plan)
    prompts = len(config.sample.prompt_specs(config.data.resolution))
    rounds = []
    if epochs:
        rounds.append(f"epochs {_numbers(epochs)}" + (" (0: before training)" if epochs[0] == 0 else ""))
    if steps:
        rounds.append(f"steps {_numbers(steps)}")
    return f"{count} images, {prompts} prompt{'s' * (prompts != 1)} after {' and '.join(rounds)}"


def _caches(config: Config) -> list[RunFile]:
    cache = config.cache_dir
    try:  # the default cache is inside output.dir
        cache = cache.relative_to(config.output.dir)
    except ValueError:
        pass
    files = []
    if config.data.cache_latents or config.validation.enabled:
        files.append(RunFile("latent cache", (f"{cache / 'latents'}/",), "entries keyed by content, reused by later runs"))
    if config.caches_text_embeddings:
        files.append(RunFile("text embeddings", (f"{cache / 'text'}/",), "the frozen text encoders' outputs"))
    return files


def _series_note(count: int, how: str, keep: int | None) -> str:
    pruned = f"; only the newest {keep} stay (output.keep_saves)" if keep and count > keep else ""
    return f"{count} files, {how}{pruned}"


def _numbers(values: list[int]) -> str:
    if len(values) <= 8:
        return ", ".join(map(str, values))
    return f"{', '.join(map(str, values[:3]))}, ..., {', '.join(map(str, values[-2:]))}"


def format_planned_files(files: list[RunFile], output_dir: Path) -> str:
    """One aligned line per kind of file; a series shows its first and last names."""
    width = max(len(file.label) for file in files)
    lines = []
    for file in files:
        names = file.names[0] if len(file.names) == 1 else (
            ", ".join(file.names) if len(file.names) <= 3 else f"{file.names[0]} ... {file.names[-1]}"
        )
        lines.append(f"  {file.label:<{width}}  {names}" + (f": {file.note}" if file.note else ""))
    return f"files (in {_shown(output_dir)}):\n" + "\n".join(lines)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
