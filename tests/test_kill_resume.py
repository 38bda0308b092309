"""A kill -9 loop: one run is killed (SIGKILL) at random moments across start-up, caching, training and saving,
resumed after each kill, and must end with exactly the LoRA and losses of an uninterrupted run.

After every kill, every `.safetensors` file in the output folder (the LoRA saves and the state folders' files)
opens and reads whole, every latent and text-embedding cache entry matches the checksum written with it, and
every state folder is complete. The cache starts empty, so the first attempts are killed while caching.

The moments come from `random.Random(SEED)`, printed with it (visible with `-s`). They are counted from the moment
an attempt takes the output folder (its pid appears in the folder's lock file), since before that the process
only imports and a kill there tests nothing: for attempt i a fraction f_i is drawn uniformly in [0, 1) and the
attempt is killed f_i * W_i seconds after taking the folder, where W_i is how long the uninterrupted run took
from taking its folder to its end (D minus its start-up), or, for an attempt resumed from a state, a little under
the part of it still to do, so that kills keep landing before the run can complete. An attempt that finishes
before its kill ends the loop (printed). On a loaded machine wall-clock moments land in somewhat different
places from run to run; the seed reproduces the draw, not the places.

    pytest -s tests/test_kill_resume.py                         # 6 kills (CI)
    LORA_TRAIN_KILLS=20 pytest -s tests/test_kill_resume.py     # 20 kills, by hand
    LORA_TRAIN_KILL_SEED=7 pytest -s tests/test_kill_resume.py  # other moments

Deselect it with `-m "not kill_loop"`.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, small_raw_config, write_yaml
from safetensors import safe_open

from lora_trainer.cache.fingerprint import tensor_digest
from lora_trainer.cache.latents import _is_intact
from lora_trainer.config.load import parse_config
from lora_trainer.fit.output_folder import run_files

KILLS = int(os.environ.get("LORA_TRAIN_KILLS", "6"))
SEED = int(os.environ.get("LORA_TRAIN_KILL_SEED", "25"))
NAME = "test_lora"
STEPS = 10  # two epochs of 5 steps: LoRA saves by step (2, 4, ...) and by epoch (5, 10), a state every step
STATE_FILES = {"state.json", "config.yaml", "history.json", "adapters.safetensors", "optimizer.safetensors", "rng.safetensors"}
TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")  # `.NAME.<pid>.<8 hex>.tmp`, files and folders
STATE_NAME = re.compile(rf"{re.escape(NAME)}-step(\d{{6}})")
FIRST_STEP = re.compile(r"training: 1/\d+ steps")


def kill_loop_raw(folder: Path) -> dict:
    """A short run that saves often (a state every step, LoRA files by step and by epoch, both pruned) and evaluates
    every epoch, so kills land in saves; only the UNet trains, so the text embeddings are cached as well."""
    raw = small_raw_config(folder)
    raw["network"].update(train_text_encoder_1=False, train_text_encoder_2=False)
    raw["training"].update(max_steps=STEPS)
    raw["validation"] = {"fraction": 0.2, "timesteps": [500]}
    raw["output"].update(save_state_every_n_steps=1, save_every_n_steps=2, save_every_n_epochs=1, keep_states=2, keep_saves=2)
    return raw


_STARTED: list[Attempt] = []


@pytest.fixture
def no_stray_processes():
    """Whatever stops the test (a failure, Ctrl-C), no training subprocess outlives it."""
    yield
    while _STARTED:
        attempt = _STARTED.pop()
        if attempt.process.poll() is None:
            attempt.stop()


class Attempt:
    """One `lora-train train` subprocess; its output goes to files, for the failure messages."""

    def __init__(self, config: Path, logs: Path, label: str, flags: tuple[str, ...]):
        self.label, self.flags = label, flags
        self.stdout, self.stderr = logs / f"{label}.out", logs / f"{label}.err"
        command = [sys.executable, "-m", "lora_trainer", "train", str(config), *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.started = time.monotonic()
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
        _STARTED.append(self)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def claimed(self, out: Path, timeout: float = 300) -> float | None:
        """Wait until this process holds `out`'s lock (its pid is in the lock file); return when, in seconds
        since it started, or None if it ended first."""
        lock = out / ".lora-train.lock"
        while self.process.poll() is None:
            try:
                if json.loads(lock.read_text()).get("pid") == self.process.pid:
                    return self.elapsed()
            except (OSError, ValueError, AttributeError):
                pass  # not written yet, or caught between its truncation and its write
            if self.elapsed() > timeout:
                self.stop()
                pytest.fail(f"{self.label} did not take {out} within {timeout} s\n{self.tail()}")
            time.sleep(0.02)
        return None

    def finish(self, timeout: float = 900) -> float | None:
        """Wait for the process to end; return when it logged its first training step (None if not seen)."""
        first_step = None
        while self.process.poll() is None:
            if first_step is None and FIRST_STEP.search(self.stderr.read_text(errors="replace")):
                first_step = self.elapsed()
            if self.elapsed() > timeout:
                self.stop()
                pytest.fail(f"{self.label} ran past {timeout} s\n{self.tail()}")
            time.sleep(0.05)
        return first_step

    def stop(self) -> int:
        os.kill(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def lines(self) -> list[str]:
        text = self.stderr.read_text(errors="replace").replace("\r", "\n")
        return [line for line in text.splitlines() if line.strip()]

    def tail(self, count: int = 15) -> str:
        return f"{self.label} {' '.join(self.flags)}: last stderr lines:\n" + "\n".join(self.lines()[-count:])

    def doing(self, folder: Path) -> str:
        """What it was doing when killed: its last line of output, paths shortened."""
        lines = self.lines()
        return lines[-1].replace(f"{folder}/", "")[:72] if lines else "(no output yet: starting up)"


def _is_temporary(path: Path, root: Path) -> bool:
    return any(TEMPORARY.fullmatch(part) for part in path.relative_to(root).parts)


def complete_states(out: Path) -> list[Path]:
    """The state folders under their final names (a state appears there only once complete), oldest first."""
    states = out / "states"
    return sorted(path for path in states.iterdir() if STATE_NAME.fullmatch(path.name)) if states.is_dir() else []


def check_output(out: Path, context: str) -> int:
    """Every `.safetensors` under `out` (temporaries aside) reads whole and every state folder is complete; returns
    the number of files read."""
    count = 0
    for path in sorted(out.rglob("*.safetensors")):
        if _is_temporary(path, out):
            continue
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        except Exception as error:  # any failure to read is the finding
            pytest.fail(f"{path} does not open after a kill: {error}\n{context}")
        count += 1
    for state in complete_states(out):
        present = {path.name for path in state.iterdir()}
        assert STATE_FILES <= present, f"state {state} is half: it lacks {sorted(STATE_FILES - present)}\n{context}"
    return count


def check_cache(cache: Path, context: str) -> tuple[int, int]:
    """Every latent and text-embedding entry matches the checksum written with it; returns how many of each."""
    latents = sorted((cache / "latents").glob("*/*.safetensors"))
    for path in latents:
        assert _is_intact(path), f"latent cache entry {path} is damaged after a kill\n{context}"
    texts = sorted((cache / "text").glob("*/*.safetensors"))
    for path in texts:
        try:
            with safe_open(path, framework="pt") as handle:
                expected = json.loads(handle.metadata()["sha256"])
                actual = [tensor_digest(handle.get_tensor("context")), tensor_digest(handle.get_tensor("pooled"))]
        except Exception as error:
            pytest.fail(f"text cache entry {path} does not open after a kill: {error}\n{context}")
        assert actual == expected, f"text cache entry {path} is damaged after a kill\n{context}"
    return len(latents), len(texts)


def temporaries(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob("*") if TEMPORARY.fullmatch(path.name)]


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def train_losses(out: Path) -> list:
    return json.loads((out / f"{NAME}-history.json").read_text())["train_losses"]


@pytest.mark.kill_loop
def test_a_run_killed_again_and_again_ends_as_an_uninterrupted_one(tmp_path, tiny_model_path, no_stray_processes):
    logs = tmp_path / "logs"
    logs.mkdir()

    reference_raw = kill_loop_raw(tmp_path / "reference")
    reference_out = Path(reference_raw["output"]["dir"])
    reference = Attempt(write_yaml(tmp_path / "reference.yaml", reference_raw), logs, "reference", ())
    claimed = reference.claimed(reference_out)
    first_step = reference.finish()
    duration = reference.elapsed()
    assert reference.process.returncode == 0 and claimed is not None, reference.tail()
    start_up = first_step if first_step is not None else (claimed + duration) / 2  # to the first step: the fixed cost

    raw = kill_loop_raw(tmp_path / "killed")
    config = write_yaml(tmp_path / "killed.yaml", raw)
    out, cache = Path(raw["output"]["dir"]), Path(raw["data"]["cache_dir"])
    output = parse_config(raw).output
    generator = random.Random(SEED)
    fractions = [round(generator.random(), 4) for _ in range(KILLS)]
    print(f"\nkill loop: seed {SEED} (LORA_TRAIN_KILL_SEED), {KILLS} kills (LORA_TRAIN_KILLS); the uninterrupted run took "
          f"D = {duration:.1f} s: {claimed:.1f} s to take its folder, {start_up:.1f} s to its first step; kill fractions: {fractions}")

    def flags() -> tuple[str, ...]:
        if complete_states(out):
            return ("--resume", "latest")
        return ("--overwrite",) if out.is_dir() and run_files(output) else ()

    completed, kills, started = None, 0, time.monotonic()
    for index, fraction in enumerate(fractions):
        states = complete_states(out)
        left = STEPS - int(STATE_NAME.fullmatch(states[-1].name)[1]) if states else STEPS
        # A resumed attempt skips the cache filling and the first evaluation the estimate includes: 0.85 of it.
        work = (duration - claimed) if not states else 0.85 * ((start_up - claimed) + (duration - start_up) * left / STEPS)
        delay = round(fraction * work, 2)
        attempt = Attempt(config, logs, f"attempt{index:02d}", flags())
        how = " ".join(attempt.flags) or "(fresh)"
        took = attempt.claimed(out)
        code = attempt.process.returncode
        if took is not None:
            try:
                code = attempt.process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                code = attempt.stop()
        context = attempt.tail()
        if code != -signal.SIGKILL:
            assert code == 0 and took is not None, f"attempt {index} failed (exit code {code}) instead of being killed\n{context}"
            print(f"  {index:2d}: {how:15s} finished in {attempt.elapsed():.1f} s, before its kill {delay} s after taking the "
                  "folder: the run completed")
            completed = attempt
            break
        kills += 1
        files = check_output(out, context)
        latents, texts = check_cache(cache, context)
        steps = [int(STATE_NAME.fullmatch(path.name)[1]) for path in complete_states(out)]
        print(f"  {index:2d}: {how:15s} killed {delay:5.2f} s after taking the folder ({attempt.elapsed():5.2f} s in), during "
              f"{attempt.doing(tmp_path)!r}; {files} files read; cache: {latents} latents, {texts} texts intact; states {steps}")

    if completed is None:
        completed = Attempt(config, logs, "final", flags())
        completed.finish()
        code = completed.process.returncode
        assert code == 0, f"the final attempt failed (exit code {code})\n{completed.tail()}"
        print(f"  final: {' '.join(completed.flags) or '(fresh)'} completed in {completed.elapsed():.1f} s")
    print(f"  {kills} kills landed; the loop took {time.monotonic() - started:.1f} s")
    check_output(out, completed.tail())
    check_cache(cache, completed.tail())
    assert check_cache(cache, "") == check_cache(Path(reference_raw["data"]["cache_dir"]), ""), "the cache is not whole"
    leftover = temporaries(out, cache)
    assert not leftover, f"temporary files of killed runs were left behind: {leftover[:5]}"

    expected, got = lora_tensors(reference_out / f"{NAME}.safetensors"), lora_tensors(out / f"{NAME}.safetensors")
    assert got.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ from the uninterrupted run's, e.g. {different[:3]}"
    assert train_losses(out) == train_losses(reference_out), "the resumed run's losses differ from the uninterrupted run's"
