"""Which base model a LoRA was trained on, as kohya records it: the name and, for a file, two hashes.

- `ss_sd_model_hash`: AUTOMATIC1111's legacy model hash, SHA-256 of the 64 KiB at offset 1 MiB, 8 hex digits
  (cheap, and what A1111 shows as "Model hash");
- `ss_new_sd_model_hash`: SHA-256 of the whole file. A 7 GB checkpoint takes tens of seconds to hash, so
  the digest is kept in the user cache keyed by (path, size, modification time) and computed once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lora_trainer.files import write_text_atomic
from lora_trainer.model.builtin import user_cache_dir
from lora_trainer.progress import progress_bar

_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000
_CHUNK = 8 << 20


def legacy_model_hash(path: Path) -> str:
    """A1111's old short model hash (files under 1 MiB hash an empty read, as A1111's does)."""
    with open(path, "rb") as handle:
        handle.seek(_LEGACY_OFFSET)
        return hashlib.sha256(handle.read(_LEGACY_LENGTH)).hexdigest()[:8]


def file_sha256(path: Path, show_progress: bool = True) -> str:
    """SHA-256 of the whole file, from the cache when the file has not changed since it was hashed."""
    path = path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    known = _read_hash_cache()
    if key in known:
        return known[key]
    digest = _hash_file(path, stat.st_size, show_progress)
    known = _read_hash_cache()  # another run may have written meanwhile
    known[key] = digest
    write_text_atomic(_hash_cache_path(), json.dumps(known, indent=1, sort_keys=True))
    return digest


def _hash_file(path: Path, size: int, show_progress: bool) -> str:
    digest = hashlib.sha256()
    disable = not show_progress or size < (256 << 20)
    with open(path, "rb") as handle, progress_bar(
        total=size, desc=f"hashing {path.name}", unit="B", unit_scale=True, disable=disable
    ) as bar:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _hash_cache_path() -> Path:
    return user_cache_dir() / "model_hashes.json"


def _read_hash_cache() -> dict[str, str]:
    try:
        loaded = json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
