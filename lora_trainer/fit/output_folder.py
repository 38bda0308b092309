"""Taking an output folder for one run: one live run per folder, no silent replacement of a finished run,
and no leftovers of a killed one.

The folder is locked with `flock` on `.lora-train.lock`: the kernel drops the lock when the process
ends, however it ends (kill -9 included), so a stale lock never blocks the next run. The lock file says
who holds it, for the message a second run gets.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
from datetime import datetime
from pathlib import Path
from typing import IO

from lora_trainer.config.output import OutputConfig
from lora_trainer.errors import UserError
from lora_trainer.files import remove_stale_temporaries
from lora_trainer.fit.state import STATES_FOLDER, saved_states

log = logging.getLogger(__name__)

LOCK_NAME = ".lora-train.lock"
SAMPLES_FOLDER = "samples"
_held: list[tuple[IO[str], Path, bool]] = []  # (open lock file, folder, made by us): the lock lasts as long as the file is open


def claim_output_folder(output: OutputConfig, cache_dir: Path, resume: bool, overwrite: bool) -> None:
    """Lock `output.dir` for this process, refuse to replace a previous run of this name unless asked, and
    remove temporary files that killed runs left here and in the cache."""
    lock_folder(output.dir)
    files = run_files(output)
    if files and not resume:
        if not overwrite:
            raise UserError(
                f"output.dir {output.dir} already holds run {output.name!r} ({_summary(files)}); continue it with "
                "--resume latest, replace it with --overwrite, or choose another output.dir or output.name"
            )
        remove_run(files)
        log.info("--overwrite: removed run %r's earlier files (%s)", output.name, _summary(files))
    removed = sum(
        remove_stale_temporaries(folder, depth)
        for folder, depth in ((output.dir, 0), (output.dir / STATES_FOLDER, 1), (output.dir / SAMPLES_FOLDER, 0), (cache_dir, 2))
    )
    if removed:
        log.info("removed %d temporary files left by killed runs", removed)


def lock_folder(folder: Path) -> None:
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = _describe_holder(handle.read())
        handle.close()
        raise UserError(
            f"output.dir {folder} is in use by another lora-train run ({holder}); wait for it to end, or choose "
            "another output.dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now().isoformat(timespec="seconds")}))
    handle.flush()
    _held.append((handle, folder, made))


def release_folders() -> None:
    """Unlock; a folder this run made and left empty (it failed before writing anything) is removed again."""
    while _held:
        handle, folder, made = _held.pop()
        if made and [path.name for path in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            folder.rmdir()
        handle.close()


def run_files(output: OutputConfig) -> list[Path]:
    """Every file and folder a run named `output.name` writes into `output.dir` (samples aside: the history
    lists them, and a new run's rounds replace them)."""
    name = re.escape(output.name)
    pattern = re.compile(
        rf"^{name}(\.safetensors|\.yaml|-\d{{6}}\.safetensors|-step\d{{6}}\.safetensors|-history\.json|-loss\.png|-timesteps\.png"
        rf"|-report(-loss|-grid)?\.(html|png)|-cut-captions\.txt)$"
    )
    found = [path for path in sorted(output.dir.iterdir()) if pattern.match(path.name)]
    found += saved_states(output)
    logs = output.dir / "logs" / output.name
    return found + ([logs] if logs.is_dir() else [])


def remove_run(files: list[Path]) -> None:
    for path in files:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _summary(files: list[Path]) -> str:
    loras = [path for path in files if path.suffix == ".safetensors"]
    states = [path for path in files if path.parent.name == STATES_FOLDER]
    parts = [f"{len(loras)} LoRA file{'s' * (len(loras) != 1)}"] if loras else []
    if states:
        parts.append(f"{len(states)} saved state{'s' * (len(states) != 1)}")
    return ", ".join(parts) or ", ".join(path.name for path in files[:3])


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that holds its lock file"
