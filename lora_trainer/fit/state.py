"""The training state: what `--resume` needs to continue a run exactly as if it had never stopped.

A state is a folder `<output.dir>/states/<name>-step<step>/`, written whole under a temporary name and
renamed (complete or absent, whatever kills the process), holding:

    state.json             counters, data position, schedule, grad scaler, Python RNG, data fingerprint
    config.yaml            the resolved config of the run that saved it
    history.json           the run history (losses, evaluations, samples) up to that step
    adapters.safetensors   the adapter weights only: the frozen base is never written (SDXL's is ~6.6 GB)
    optimizer.safetensors  the optimizer's tensors (its other values are in state.json)
    rng.safetensors        torch's CPU and CUDA generator states, one set per process (dropout)
    ema.safetensors        with `training.ema` on: the moving average of the adapters (its update count is in state.json)

Data order, caption randomness, noise and timesteps are pure functions of (seed, epoch, place in the
epoch), so the data position is two numbers and no generator of ours needs saving. Everything is read
through JSON and safetensors: nothing is unpickled, since `--resume PATH` is a file a user hands us
(Accelerate's `load_state` would unpickle it).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lora_trainer.adapters.lora import lora_parameters
from lora_trainer.cache.fingerprint import text_digest
from lora_trainer.cache.training_data import TrainingItem
from lora_trainer.config.load import dump_config
from lora_trainer.config.output import OutputConfig
from lora_trainer.config.schema import Config
from lora_trainer.errors import UserError
from lora_trainer.files import directory_atomic, temporary_name, write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from lora_trainer.fit.ema import AdapterEMA

log = logging.getLogger(__name__)

STATE_FORMAT = 1
STATES_FOLDER = "states"
_STATE_NAME = re.compile(r"^(?P<name>.+)-step(?P<step>\d{6,})$")


@dataclass(frozen=True)
class Position:
    """Where a run is: `step` optimizer steps done, `batches_done` global batches of `epoch` trained."""

    step: int
    epoch: int
    batches_done: int


@dataclass(frozen=True)
class SavedState:
    folder: Path
    position: Position
    total_steps: int
    global_batch_size: int  # per-device batch x processes, the images of one global batch
    num_processes: int
    data_fingerprint: str
    config_text: str
    values: dict[str, Any]  # the rest of state.json


def states_folder(output: OutputConfig) -> Path:
    return output.dir / STATES_FOLDER


def state_folder(output: OutputConfig, step: int) -> Path:
    return states_folder(output) / f"{output.name}-step{step:06d}"


def saved_states(output: OutputConfig) -> list[Path]:
    """This run's complete states, oldest first (a folder appears only once complete)."""
    folder = states_folder(output)
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _STATE_NAME.match(path.name)
        if match and match["name"] == output.name and (path / "state.json").is_file():
            found.append((int(match["step"]), path))
    return [path for _, path in sorted(found)]


def data_fingerprint(items: list[TrainingItem], config: Config) -> str:
    """Names what the run trains on: each image (its content through the latent cache's key, else its size and
    modification time), caption, repeats, weight and crop."""
    entries = []
    for item in items:
        record = item.record
        root = config.datasets[record.dataset_index].path
        if item.latent is not None:
            content: Any = item.latent.path.stem
        else:
            status = record.image_path.stat()
            content = [status.st_size, status.st_mtime_ns]
        relative = str(record.image_path.relative_to(root)) if record.image_path.is_relative_to(root) else str(record.image_path)
        entries.append([record.dataset_index, relative, record.caption, record.repeats, record.is_reg, record.loss_weight,
                        asdict(item.plan), content])
    return text_digest(json.dumps(sorted(entries, key=json.dumps), sort_keys=True))


# Saving ---------------------------------------------------------------------------------------------------


def write_state(
    folder: Path,
    config: Config,
    position: Position,
    trained: dict[str, torch.nn.Module],
    optimizer: Any,
    lr_scheduler: Any,
    grad_scaler: Any,
    rng_states: list[dict[str, Any]],
    history_json: str,
    counters: dict[str, Any],
    ema: AdapterEMA | None = None,
) -> None:
    """Write one state folder atomically (`trained`: unwrapped models; `rng_states`: one per process; `ema`: the
    run's average of the adapters, if it keeps one)."""
    optimizer_tensors, optimizer_values = _split_optimizer_state(optimizer.state_dict())
    rng_tensors, python_rng = _rng_tensors(rng_states)
    state = {
        "format": STATE_FORMAT,
        "position": asdict(position),
        **counters,
        "optimizer": optimizer_values,
        "lr_scheduler": lr_scheduler.state_dict(),
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "python_rng": python_rng,
        "ema": ema.state_values() if ema is not None else None,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with directory_atomic(folder) as temporary:
        write_bytes_atomic(temporary / "adapters.safetensors", save(adapter_tensors(trained)))
        write_bytes_atomic(temporary / "optimizer.safetensors", save(optimizer_tensors))
        write_bytes_atomic(temporary / "rng.safetensors", save(rng_tensors))
        if ema is not None:
            write_bytes_atomic(temporary / "ema.safetensors", save(ema.state_tensors()))
        write_text_atomic(temporary / "config.yaml", dump_config(config))
        write_text_atomic(temporary / "history.json", history_json)
        write_text_atomic(temporary / "state.json", json.dumps(state, indent=1))
        replaced = _move_aside(folder)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _move_aside(folder: Path) -> Path | None:
    """An older state of the same step (a run resumed from an earlier state gets there again) is renamed to a
    temporary name, which the next run would clean up, so the new one can take its name."""
    if not folder.exists():
        return None
    aside = temporary_name(folder)
    folder.rename(aside)
    return aside


def adapter_tensors(trained: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every adapter parameter (trainable or not), as `<part>/<parameter name>`; nothing of the base."""
    tensors = {}
    for part, model in trained.items():
        adapter_ids = {id(parameter) for parameter in lora_parameters(model)}
        for name, parameter in model.named_parameters():
            if id(parameter) in adapter_ids:
                tensors[f"{part}/{name}"] = parameter.detach().to("cpu").contiguous()
    return tensors


def process_rng_state() -> dict[str, Any]:
    """This process's generator states: torch CPU and CUDA (dropout draws from them) and Python's."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "python": _json_ready(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def prune_states(output: OutputConfig) -> None:
    """Remove all but the newest `output.keep_states` states. Each is first renamed to a temporary name, so a
    kill while deleting never leaves a half state under a state's name."""
    for path in saved_states(output)[: -output.keep_states]:
        doomed = temporary_name(path)
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's tensors apart (for safetensors), its other values as JSON with a `{"tensor": key}` in place
    of each tensor, nested dicts included (bitsandbytes keeps its 8-bit state in one)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def pack(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            if tensor.untyped_storage().data_ptr() in storages:  # bitsandbytes shares one quantization map among
                tensor = tensor.clone()  # all parameters, and safetensors refuses tensors that share memory
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[key] = tensor
            return {"tensor": key}
        if isinstance(value, dict):
            return {str(name): pack(item, f"{key}.{name}") for name, item in value.items()}
        return value

    values = {str(index): pack(entries, str(index)) for index, entries in state_dict["state"].items()}
    return tensors, {"state": values, "param_groups": state_dict["param_groups"]}


def _unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"tensor"} and isinstance(value["tensor"], str):
            return tensors[value["tensor"]]
        return {name: _unpack(item, tensors) for name, item in value.items()}
    return value


def _rng_tensors(rng_states: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    tensors = {}
    for rank, state in enumerate(rng_states):
        tensors[f"rank{rank}.cpu"] = state["cpu"]
        for device, cuda_state in enumerate(state.get("cuda", [])):
            tensors[f"rank{rank}.cuda{device}"] = cuda_state
    return tensors, [state["python"] for state in rng_states]


def _json_ready(value: Any) -> Any:
    return [_json_ready(item) for item in value] if isinstance(value, (tuple, list)) else value


# Loading --------------------------------------------------------------------------------------------------


def find_state(output: OutputConfig, resume: str) -> Path:
    """The state folder `--resume` names: `latest` (this run's newest complete state) or a path to a state folder."""
    if resume == "latest":
        states = saved_states(output)
        if not states:
            raise UserError(
                f"--resume latest: no saved state of run {output.name!r} in {states_folder(output)}; states are saved by "
                "a stop (Ctrl-C, SIGTERM) and by output.save_state_every_n_steps / save_state_every_n_epochs"
            )
        return states[-1]
    folder = Path(resume).expanduser().resolve()
    if not (folder / "state.json").is_file():
        raise UserError(f"--resume {resume}: not a training state (a folder with state.json, as in {states_folder(output)}); "
                        "give one of those folders, or latest")
    return folder


def read_state(folder: Path) -> SavedState:
    try:
        values = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        config_text = (folder / "config.yaml").read_text(encoding="utf-8")
        if values.get("format") != STATE_FORMAT:
            raise ValueError(f"state format {values.get('format')}, this version reads {STATE_FORMAT}")
        return SavedState(
            folder=folder,
            position=Position(**values.pop("position")),
            total_steps=values.pop("total_steps"),
            global_batch_size=values.pop("global_batch_size"),
            num_processes=values.pop("num_processes"),
            data_fingerprint=values.pop("data_fingerprint"),
            config_text=config_text,
            values=values,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{folder}: not a readable training state ({error}); resume from another state") from None


def load_adapter_tensors(trained: dict[str, torch.nn.Module], folder: Path) -> None:
    """Copy the saved adapter weights into the (unwrapped) models' adapters, every one accounted for."""
    tensors = _load_safetensors(folder / "adapters.safetensors")
    expected = adapter_tensors(trained)
    if set(tensors) != set(expected):
        difference = sorted(set(tensors) ^ set(expected))
        raise UserError(f"{folder}: its adapters do not fit this run's (e.g. {difference[0]}); resume with the config it was saved with")
    with torch.no_grad():
        for part, model in trained.items():
            parameters = dict(model.named_parameters())
            for key in [key for key in tensors if key.startswith(f"{part}/")]:
                parameters[key[len(part) + 1 :]].copy_(tensors[key])


def load_optimizer_state(optimizer: Any, saved: SavedState) -> None:
    tensors = _load_safetensors(saved.folder / "optimizer.safetensors")
    values = saved.values["optimizer"]
    state = {int(index): _unpack(entries, tensors) for index, entries in values["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": values["param_groups"]})


def load_ema_state(ema: AdapterEMA, saved: SavedState) -> None:
    """Restore the moving average of the adapters and its update count, every averaged parameter accounted for."""
    if saved.values.get("ema") is None:
        raise UserError(f"{saved.folder}: this state was saved without training.ema; resume with the config it was saved with")
    tensors = _load_safetensors(saved.folder / "ema.safetensors")
    if set(tensors) != set(ema.names):
        difference = sorted(set(tensors) ^ set(ema.names))
        raise UserError(f"{saved.folder}: its EMA does not fit this run's adapters (e.g. {difference[0]}); resume with the config it was saved with")
    ema.load_state_tensors(tensors, saved.values["ema"])


def restore_rng_state(saved: SavedState, rank: int, seed: int) -> bool:
    """Set this process's generators as saved; False (and seeded from the step instead) when the state was saved
    with fewer processes than this rank."""
    tensors = _load_safetensors(saved.folder / "rng.safetensors")
    if f"rank{rank}.cpu" not in tensors:
        torch.manual_seed(seed + 1_000 * rank + saved.position.step)
        return False
    torch.set_rng_state(tensors[f"rank{rank}.cpu"])
    cuda = [tensors[key] for key in sorted(key for key in tensors if key.startswith(f"rank{rank}.cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    python = saved.values["python_rng"][rank]
    random.setstate((python[0], tuple(python[1]), python[2]))
    return True


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        raise UserError(f"{path}: cannot read this part of the training state ({error}); resume from another state") from None
