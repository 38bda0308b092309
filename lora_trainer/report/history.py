"""What a run leaves for its report: losses, evaluations per epoch, sample images; kept as JSON beside the LoRA.

The file is rewritten (atomically) whenever something is added, so a report can be made from an
interrupted run, and `lora-train report OUTPUT_DIR` needs nothing but this file and the images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_trainer.errors import UserError
from lora_trainer.files import write_text_atomic

HISTORY_FORMAT = 1


@dataclass
class EpochRecord:
    """One evaluated or saved epoch. Epoch 0 is the state before training (the baseline)."""

    epoch: int
    step: int
    lora_file: str | None = None  # file name in the output folder, if this epoch's LoRA was saved
    validation_loss: float | None = None


@dataclass
class SampleRecord:
    epoch: int  # 0: the baseline, before training
    step: int
    prompt_index: int
    prompt: str
    seed: int
    image: str  # path relative to the output folder


@dataclass
class RunHistory:
    name: str
    steps_per_epoch: int
    prompts: list[str] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)  # one per optimizer step
    epochs: list[EpochRecord] = field(default_factory=list)
    samples: list[SampleRecord] = field(default_factory=list)
    timestep_counts: list[int] = field(default_factory=list)  # how often each training timestep was drawn
    peak_gpu_memory_gib: float | None = None  # torch's allocated peak on this process's GPU; None on a CPU

    def count_timesteps(self, timesteps: Iterable[int], num_train_timesteps: int) -> None:
        """Add drawn training timesteps to `timestep_counts` (one count per timestep of the schedule)."""
        self.timestep_counts.extend([0] * (num_train_timesteps - len(self.timestep_counts)))
        for timestep in timesteps:
            self.timestep_counts[timestep] += 1

    def epoch_record(self, epoch: int, step: int) -> EpochRecord:
        """The record of `epoch`, created if this is the first thing known about it."""
        for record in self.epochs:
            if record.epoch == epoch:
                return record
        record = EpochRecord(epoch, step)
        self.epochs.append(record)
        self.epochs.sort(key=lambda entry: entry.epoch)
        return record

    def best_epoch(self) -> EpochRecord | None:
        """The epoch with the lowest validation loss (the baseline excluded), or None without validation."""
        evaluated = [record for record in self.epochs if record.validation_loss is not None and record.epoch > 0]
        return min(evaluated, key=lambda record: record.validation_loss) if evaluated else None

    def to_json(self) -> str:
        return json.dumps({"format": HISTORY_FORMAT, **asdict(self)}, indent=1)

    def save(self, path: Path) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> RunHistory:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw.pop("format", None)
            raw["epochs"] = [EpochRecord(**entry) for entry in raw.get("epochs", [])]
            raw["samples"] = [SampleRecord(**entry) for entry in raw.get("samples", [])]
            return cls(**raw)
        except FileNotFoundError:
            raise UserError(f"{path}: no run history here; give the output folder of a lora-train run") from None
        except (OSError, ValueError, TypeError) as error:
            raise UserError(f"{path}: not a lora-train run history ({error})") from None


def history_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{name}-history.json"


def find_run_name(output_dir: Path) -> str:
    """The name of the one run whose history is in `output_dir`."""
    if not output_dir.is_dir():
        raise UserError(f"{output_dir}: folder not found; give the output.dir of a training run")
    names = sorted(path.name[: -len("-history.json")] for path in output_dir.glob("*-history.json"))
    if not names:
        raise UserError(f"{output_dir}: no run history (*-history.json) here; give the output.dir of a training run")
    if len(names) > 1:
        raise UserError(f"{output_dir}: several runs here ({', '.join(names)}); choose one with --name")
    return names[0]
