"""Shared fixtures: an isolated cache home with the builtin tiny SDXL, and configs that train on it.

Nothing here touches the network: the tiny model is built in-process and saved as a diffusers
folder, then loaded through the same code path as a real SDXL checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Twelve shapes of several sizes and aspect ratios (scripts/make_test_shapes.py), for the data pipeline's tests.
MIXED_SHAPES = REPO / "tests" / "data" / "mixed_shapes"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def lora_train_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache home for the whole session, so the builtin model is built once, here."""
    home = tmp_path_factory.mktemp("lora-train-home")
    previous = os.environ.get("LORA_TRAIN_HOME")
    os.environ["LORA_TRAIN_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("LORA_TRAIN_HOME", None)
    else:
        os.environ["LORA_TRAIN_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_model_path(lora_train_home: Path) -> Path:
    from lora_trainer.model.builtin import builtin_model_path

    return builtin_model_path("tiny-sdxl")


def copy_examples(folder: Path, count: int) -> list[Path]:
    """The first `count` mixed shapes with their captions, copied into `folder`; the copies' image paths."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    images = sorted(MIXED_SHAPES.glob("*.png"))[:count]
    for image in images:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    return [folder / image.name for image in images]


def small_raw_config(folder: Path) -> dict:
    """A small, fast training config on the tiny model and the example dataset, writing under `folder`."""
    return {
        "model": {"pretrained": "builtin:tiny-sdxl"},
        "datasets": [{"path": str(MIXED_SHAPES)}],
        "data": {"resolution": 64, "cache_dir": str(folder / "cache")},
        "network": {"rank": 4, "alpha": 2},
        "training": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "mixed_precision": "no", "seed": 0},
        "output": {"dir": str(folder / "out"), "name": "test_lora", "save_dtype": "fp32"},
    }


@pytest.fixture
def raw_config(tmp_path: Path, tiny_model_path: Path) -> dict:
    return small_raw_config(tmp_path)


def write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `lora-train ARGS` in this process; return (exit code, stdout, stderr)."""
    from lora_trainer.cli import main

    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test gets a fresh one, as each CLI run does."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_in_process(raw: dict):
    """Run setup -> fit -> finalize and return (run, path), keeping the in-memory adapters for comparison."""
    from lora_trainer.config.load import parse_config
    from lora_trainer.fit.loop import fit
    from lora_trainer.fit.save import finalize
    from lora_trainer.fit.setup import setup

    run = setup(parse_config(raw))
    try:
        fit(run)
        path = finalize(run)
    finally:
        run.accelerator.end_training()
    return run, path


@pytest.fixture(scope="session")
def quickstart_run(lora_train_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """`lora-train train configs/quickstart.yaml` run once per session, as a user runs it: (output folder, result)."""
    out = tmp_path_factory.mktemp("quickstart") / "quickstart"
    return out, run_quickstart(out)


def run_quickstart(out: Path, *settings: str) -> subprocess.CompletedProcess:
    """`lora-train train configs/quickstart.yaml` into `out`, with `--set` overrides such as "training.optimizer=adamw8bit"."""
    overrides = [argument for setting in settings for argument in ("--set", setting)]
    return subprocess.run(
        [sys.executable, "-m", "lora_trainer", "train", "configs/quickstart.yaml", "--set", f"output.dir={out}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=os.environ.copy(),
    )


@pytest.fixture(scope="session")
def small_lora_file(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained for a few steps on the tiny model, strong enough to change what it draws."""
    raw = small_raw_config(tmp_path_factory.mktemp("small-lora"))
    raw["training"].update(max_steps=4, learning_rate=5e-2)
    from accelerate.state import AcceleratorState, GradientState

    _, path = train_in_process(raw)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return path


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) logged under `tag` in the TensorBoard event files below `folder`, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for event_file in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return sorted(points)
