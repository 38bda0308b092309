"""What a model file is, known from its safetensors header alone, before any weight is read.

A safetensors file opens with an 8-byte little-endian header length and that many bytes of JSON: each
tensor's dtype, shape and byte range, plus an optional `__metadata__` map of strings. That is enough to
refuse, in a second and in one line, a file lora-train cannot train on (a text file, a half download, an
SD1.5 model, a LoRA...) instead of failing minutes into loading. `checkpoint_kinds` holds the families
and layouts; this module reads the header and turns what it finds into `CheckpointFacts`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import ModelFileError
from lora_trainer.model.checkpoint_kinds import (
    base_shape_differences,
    foreign_file,
    not_base_shaped,
    sdxl_family_refusal,
)

# safetensors itself refuses headers over 100 MB; a bigger length field means the file is something else.
MAX_HEADER_BYTES = 100_000_000
ZIP_MAGIC = b"PK\x03\x04"  # torch.save has written zip archives since PyTorch 1.6
# Printable ASCII and the usual whitespace: a header length never looks like this (its high bytes are 0).
TEXT_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}
TRUTHY = ("true", "1", "yes")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header (or a loaded state dict) describes it; dtype in safetensors' spelling (`F16`)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class CheckpointFacts:
    """What an accepted SDXL checkpoint says about itself; the loader decides what to do with each fact."""

    prediction_type: str | None  # "epsilon" / "v_prediction" when the file says so, else None
    zero_terminal_snr: bool  # a `ztsnr` key, or metadata saying so
    has_vae: bool  # first_stage_model.* present
    has_text_encoders: bool  # both conditioner.embedders.0.transformer.* and conditioner.embedders.1.model.*
    sdxl_base_shape: bool  # widths and transformer depths equal SDXL base 1.0's (so SDXL base's configs fit)
    description: str  # short, e.g. "SDXL base-shaped checkpoint (v-prediction, zero-terminal SNR)"


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors by key and the `__metadata__` strings, from the header only (8-byte little-endian length + JSON)."""
    path = Path(path)
    raw, data_held = _header_bytes(path)
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    tensors, data_described = {}, 0
    for key, entry in header.items():
        tensors[key], end = _tensor_entry(path, key, entry)
        data_described = max(data_described, end)
    _check_complete(path, data_described, data_held)
    return tensors, metadata


def _header_bytes(path: Path) -> tuple[bytes, int]:
    """The header's JSON bytes and how many bytes of tensor data follow them; nothing past the header is read."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else None
            if length is None or length > MAX_HEADER_BYTES or 8 + length > size:
                # Read a little more only to say what the file is; a real header is never this.
                raise _not_safetensors(path, _length_problem(head + handle.read(56), size, length))
            return handle.read(length), size - 8 - length
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read it ({error.strerror or error})") from error


def inspect_sdxl_checkpoint(
    label: str, tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str], *, require_base_shape: bool = True
) -> CheckpointFacts:
    """Raise ModelFileError(one line, starting with `label: `) unless the file is an SDXL base-family checkpoint
    in the original (LDM) layout.

    Classified from keys and shapes only, so `tensors` may as well describe a pickled state dict. With
    `require_base_shape=False` (the user describes the model with `model.config`), other widths and
    depths are accepted and `sdxl_base_shape` only reports them.
    """
    shapes = {key: tuple(info.shape) for key, info in tensors.items()}
    refusal = foreign_file(shapes, metadata) or sdxl_family_refusal(shapes)
    if refusal:
        raise ModelFileError(f"{label}: {refusal}")
    differences = base_shape_differences(shapes)
    if differences and require_base_shape:
        raise ModelFileError(f"{label}: {not_base_shaped(differences)}")
    prediction_type = _prediction_type(shapes, metadata)
    zero_terminal_snr = "ztsnr" in shapes or metadata.get("ss_zero_terminal_snr", "").lower() in TRUTHY
    has_vae = any(key.startswith("first_stage_model.") for key in shapes)
    has_text_encoders = all(
        any(key.startswith(prefix) for key in shapes)
        for prefix in ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
    )
    return CheckpointFacts(
        prediction_type=prediction_type,
        zero_terminal_snr=zero_terminal_snr,
        has_vae=has_vae,
        has_text_encoders=has_text_encoders,
        sdxl_base_shape=not differences,
        description=_description(not differences, prediction_type, zero_terminal_snr, has_vae, has_text_encoders),
    )


def _not_safetensors(path: Path, reason: str) -> ModelFileError:
    return ModelFileError(f"{path}: not a safetensors file ({reason})")


def _length_problem(head: bytes, size: int, length: int | None) -> str:
    """Why the first bytes cannot open a safetensors file, said as what the file looks like instead."""
    if length is None:
        return f"{size} bytes, too short for a header"
    if head.startswith(ZIP_MAGIC) or _pickle_protocol_start(head):
        return "it is a PyTorch pickle or zip archive (.ckpt/.pt/.bin) renamed; lora-train reads weights through safetensors"
    if all(byte in TEXT_BYTES for byte in head[:8]):
        return _text_kind(head.decode("ascii", errors="replace"))
    if length > MAX_HEADER_BYTES:
        return f"its header length field says {length:,} bytes, over safetensors' 100 MB limit"
    return f"its header length field says {length:,} bytes, but the file holds {size:,}"


def _text_kind(text: str) -> str:
    """A text file where weights were expected: usually a Git LFS pointer or an error page from a download."""
    if text.startswith("version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights; fetch them with `git lfs pull` or download the file again"
    if text.lstrip().lower().startswith(("<!doctype", "<html", "<?xml")):
        return "it is a web page, not weights; the download went wrong, download the file again"
    first_line = text.splitlines()[0] if text.splitlines() else text
    return f"it is text, starting {first_line[:40]!r}"


def _pickle_protocol_start(head: bytes) -> bool:
    # Pickle protocols 2-5 open with the PROTO opcode 0x80 and the protocol number.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _parse_json(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _not_safetensors(path, "its header is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise _not_safetensors(path, f"its header is not valid JSON: {error.msg} at byte {error.pos}") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is JSON but not an object of tensors")
    return header


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    # safetensors requires a map of strings here (or null); anything else would fail to load later.
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise _not_safetensors(path, "its __metadata__ is not a map of strings")
    return dict(metadata)


def _tensor_entry(path: Path, key: str, entry: object) -> tuple[TensorInfo, int]:
    """One header entry as a TensorInfo, and where its bytes end in the data region."""
    if isinstance(entry, dict):
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(isinstance(size, int) and size >= 0 for size in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(offset, int) for offset in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            return TensorInfo(shape=tuple(shape), dtype=dtype), offsets[1]
    raise _not_safetensors(path, f"tensor {key!r} in its header has no valid dtype, shape and data_offsets")


def _check_complete(path: Path, described: int, held: int) -> None:
    # The last tensor must end inside the file: a cut-off download has a whole header and half the data.
    if described > held:
        raise ModelFileError(
            f"{path}: truncated: the header describes {described:,} bytes of tensors but the file holds {held:,}; "
            "download it again"
        )


def _prediction_type(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    """v-prediction where the file says so: a `v_pred` key (kohya, ComfyUI, NoobAI) or modelspec metadata."""
    if "v_pred" in shapes:
        return "v_prediction"
    # The ModelSpec spec writes `modelspec.prediction_type` ("v" / "epsilon"); ComfyUI's checkpoint save
    # writes `modelspec.predict_key` with the same values.
    for field in ("modelspec.prediction_type", "modelspec.predict_key"):
        value = metadata.get(field, "").strip().lower().replace("-", "_")
        if value in ("v", "v_prediction", "vpred", "v_pred"):
            return "v_prediction"
        if value in ("epsilon", "eps"):
            return "epsilon"
    return None


def _description(base_shape: bool, prediction_type: str | None, ztsnr: bool, has_vae: bool, has_text: bool) -> str:
    name = "SDXL base-shaped checkpoint" if base_shape else "SDXL-family checkpoint with other widths or depths than SDXL base"
    notes = [{"v_prediction": "v-prediction", "epsilon": "epsilon"}.get(prediction_type or "", "")]
    notes += ["zero-terminal SNR" if ztsnr else "", "" if has_vae else "no VAE", "" if has_text else "no text encoders"]
    notes = [note for note in notes if note]
    return f"{name} ({', '.join(notes)})" if notes else name
