"""Content fingerprints: what a cache key is made of, so a cached result is reused only for identical inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (images can be large; memory stays flat)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


def module_fingerprint(module: torch.nn.Module, extra: dict[str, Any] | None = None) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) plus `extra` settings.

    Two models get the same fingerprint exactly when they compute the same function, wherever they were
    loaded from (a hub id, a folder, a different variant), so caches follow the weights, not the names.
    """
    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def text_digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
