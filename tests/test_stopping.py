"""Ctrl-C and SIGTERM on a real `lora-train train` process: the step finishes, state and LoRA are saved, the exit
code says how it ended, and `--resume latest` then ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import REPO, small_raw_config, write_yaml
from safetensors import safe_open
from safetensors.torch import load_file


def stoppable_raw(folder: Path) -> dict:
    raw = small_raw_config(folder)
    raw["training"]["max_steps"] = 20
    raw["data"]["workers"] = 2  # workers ignore SIGINT: the terminal sends it to the whole process group
    return raw


def start_training(config: Path, *extra: str) -> subprocess.Popen:
    # A session of its own, so a signal can go to the whole group, as a terminal's Ctrl-C does.
    return subprocess.Popen(
        [sys.executable, "-m", "lora_trainer", "train", str(config), *extra],
        cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def wait_for_training(process: subprocess.Popen) -> list[str]:
    """Read stderr until the first progress line of training; return the lines read."""
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("training: "):
            return lines
    raise AssertionError("training never started:\n" + "".join(lines[-20:]))


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, rest = process.communicate(timeout=240)
    return process.returncode, rest


def test_ctrl_c_saves_state_and_lora_exits_130_and_the_resume_matches_an_uninterrupted_run(tiny_model_path, tmp_path):
    from conftest import train_in_process

    raw = stoppable_raw(tmp_path / "stopped")
    config = write_yaml(tmp_path / "stopped.yaml", raw)
    process = start_training(config)
    wait_for_training(process)
    os.killpg(process.pid, signal.SIGINT)
    code, err = finish(process)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    stop_line = next(line for line in err.splitlines() if line.startswith("stopped by Ctrl-C after step"))
    step = int(stop_line.split("after step ")[1].split()[0])
    assert 0 < step < 20
    out = Path(raw["output"]["dir"])
    assert (out / "states" / f"test_lora-step{step:06d}" / "state.json").is_file()
    with safe_open(out / f"test_lora-step{step:06d}.safetensors", framework="pt") as handle:
        assert len(list(handle.keys())) > 0
    assert f"continue with: lora-train train {config} --resume latest" in stop_line

    resumed = subprocess.run(
        [sys.executable, "-m", "lora_trainer", "train", str(config), "--resume", "latest"],
        cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference_raw = stoppable_raw(tmp_path / "reference")
    _, reference = train_in_process(reference_raw)
    expected, got = load_file(reference), load_file(out / "test_lora.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    losses = [json.loads((folder / "test_lora-history.json").read_text())["train_losses"] for folder in (reference.parent, out)]
    assert losses[0] == losses[1]


def test_sigterm_saves_and_exits_143(tiny_model_path, tmp_path):
    raw = stoppable_raw(tmp_path)
    process = start_training(write_yaml(tmp_path / "c.yaml", raw))
    wait_for_training(process)
    process.send_signal(signal.SIGTERM)
    code, err = finish(process)
    assert code == 143, err[-3000:]
    assert "stopped by SIGTERM after step" in err
    assert list((Path(raw["output"]["dir"]) / "states").glob("test_lora-step*/state.json"))


def test_a_second_ctrl_c_stops_at_once_leaving_only_whole_files(tiny_model_path, tmp_path):
    raw = stoppable_raw(tmp_path)
    process = start_training(write_yaml(tmp_path / "c.yaml", raw))
    wait_for_training(process)
    os.killpg(process.pid, signal.SIGINT)
    assert process.stderr.readline().strip() == ""  # the handler's message starts with a line break
    assert process.stderr.readline().startswith("Ctrl-C: finishing this step")
    os.killpg(process.pid, signal.SIGINT)  # signals that arrive together count once, so this one waits for the first
    code, err = finish(process)
    assert code == 130, err[-3000:]
    assert "interrupted; files already saved are complete" in err and "Traceback" not in err, err
    out = Path(raw["output"]["dir"])
    assert not [path for path in out.rglob("*.tmp")]
    for path in out.rglob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)


def test_an_interrupted_config_load_still_exits_130(tmp_path, capsys, monkeypatch):
    """Typer turns a Ctrl-C it catches into a returned 130, which `main` used to drop (exit 0)."""
    from conftest import run_cli

    import lora_trainer.config.load as load

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(load, "load_config", interrupted)
    code, _, err = run_cli(["train", tmp_path / "c.yaml"], capsys)
    assert code == 130 and "interrupted" in err
