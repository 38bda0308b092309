"""A single-file SDXL checkpoint (original Stability layout, as model sites ship them), read part by part.

The header is read and the file classified before any weight is touched (`checkpoint_file`), so a wrong
file is refused in a second, not after minutes of loading. Each part then reads only its own tensors
(`model.diffusion_model.*` for the UNet, `first_stage_model.*` for the VAE, `conditioner.embedders.*` for
the text encoders) and goes through diffusers' single-file converters, with the diffusers configs and
tokenizers of `model.config`, or SDXL base 1.0's shipped with lora-train: nothing is fetched from the hub.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import ModelFileError
from lora_trainer.model.checkpoint_file import CheckpointFacts, TensorInfo, inspect_sdxl_checkpoint, read_safetensors_header

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "conditioner.embedders."


class WeightsFile:
    """One weights file named in `field`: safetensors, read tensor by tensor, or an allowed pickle, read whole."""

    def __init__(self, path: Path, field: str):
        self.path = path
        self.field = field
        self.label = f"{field}: {path}"
        self.is_safetensors = path.suffix.lower() == ".safetensors"

    def header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """Every tensor's shape and dtype and the metadata; for safetensors without reading a weight."""
        if not self.is_safetensors:
            return _tensor_infos(self._pickled_state), {}
        try:
            return read_safetensors_header(self.path)
        except ModelFileError as error:
            raise ModelFileError(f"{self.field}: {error}") from None

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with `prefix`, keys as in the file; only those are read from disk."""
        if not self.is_safetensors:
            return {key: value for key, value in self._pickled_state.items() if key.startswith(prefix)}
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}

    @cached_property
    def _pickled_state(self) -> dict[str, torch.Tensor]:
        return read_pickled_state_dict(self.path, self.label)


class SingleFileCheckpoint(WeightsFile):
    """One checkpoint file, classified on construction; its parts' tensors are read on request."""

    def __init__(self, path: Path, field: str, require_base_shape: bool):
        super().__init__(path, field)
        tensors, metadata = self.header()
        self.facts: CheckpointFacts = inspect_sdxl_checkpoint(self.label, tensors, metadata, require_base_shape=require_base_shape)


class VaeFile(WeightsFile):
    """A separate VAE file (`model.vae`): its own layout (LDM or diffusers keys), or a whole checkpoint's VAE."""

    def __init__(self, path: Path, field: str):
        super().__init__(path, field)
        tensors, _ = self.header()
        self.prefix = VAE_PREFIX if any(key.startswith(VAE_PREFIX) for key in tensors) else ""
        _check_sdxl_vae(self.label, tensors, self.prefix)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return super().tensors(self.prefix + prefix)


def _check_sdxl_vae(label: str, tensors: Mapping[str, TensorInfo], prefix: str) -> None:
    """An SDXL VAE has an encoder whose last conv makes 8 channels (mean and log-variance of 4 latent channels)."""
    conv_out = tensors.get(prefix + "encoder.conv_out.weight")
    if conv_out is None:
        raise ModelFileError(f"{label}: does not look like a VAE (no encoder.conv_out.weight); give an SDXL VAE file or folder")
    if conv_out.shape[0] != 8:
        latent_channels = conv_out.shape[0] // 2
        raise ModelFileError(
            f"{label}: a VAE with {latent_channels} latent channels (SD3/Flux-style); SDXL's VAE has 4, give an SDXL VAE"
        )


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep diffusers' and transformers' own warnings (deprecations, unused keys, hub chatter) out of our output:
    what matters to the user is checked and said by us, in one line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def read_pickled_state_dict(path: Path, label: str) -> dict[str, torch.Tensor]:
    """A `.ckpt`/`.pt`/`.bin` state dict, read with `weights_only=True` so the pickle can build tensors and
    plain containers only, never call code (the user allowed pickles with `model.allow_pickle`)."""
    import pickle

    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{label}: cannot read this pickle safely ({reason[:200]}); convert it to .safetensors") from None
    while isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ModelFileError(f"{label}: holds a {type(loaded).__name__}, not a state dict of tensors")
    return {key: value for key, value in loaded.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}


def _tensor_infos(state: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {key: TensorInfo(tuple(value.shape), str(value.dtype).removeprefix("torch.")) for key, value in state.items()}


@contextmanager
def conversion_errors(label: str, part: str) -> Iterator[None]:
    """diffusers' converters fail on a file that lacks weights or is shaped otherwise with errors that name
    no key (a bare KeyError, "Cannot copy out of meta tensor"); say which file and part instead."""
    try:
        yield
    except (KeyError, NotImplementedError, RuntimeError, ValueError, OSError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ModelFileError(
            f"{label}: cannot build the {part} from this file ({reason}); it is incomplete, or shaped otherwise than "
            "its configs (model.config) describe"
        ) from None


def check_fully_loaded(model: torch.nn.Module, label: str, part: str) -> None:
    """Refuse a part some of whose weights the file lacked (diffusers leaves them on the meta device)."""
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise ModelFileError(
            f"{label}: the {part} lacks {len(missing)} weights (first: {missing[0]}); the file is incomplete "
            "or not shaped like model.config describes"
        )
