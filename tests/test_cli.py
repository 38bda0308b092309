"""The command line explains itself, and `sample` turns a LoRA into images."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import REPO, run_cli
from PIL import Image


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["cache-latents", "--help"], ["sample", "--help"]])
def test_help_explains_each_command(args, capsys):
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    assert "Usage: lora-train" in out
    if args == ["--help"]:
        assert all(command in out for command in ("train", "cache-latents", "sample"))
    if args[0] in ("train", "cache-latents"):
        assert "--set" in out and "CONFIG" in out


def test_console_script_and_module_both_run():
    assert shutil.which("lora-train"), "pip install -e . provides the lora-train command"
    for command in (["lora-train", "--help"], [sys.executable, "-m", "lora_trainer", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert result.returncode == 0 and "cache-latents" in result.stdout


def test_unknown_command_is_a_usage_error(capsys):
    code, _, err = run_cli(["trian"], capsys)
    assert code == 2 and "No such command" in err


@pytest.fixture
def trained_lora(small_lora_file):
    return small_lora_file


def test_sample_writes_one_png_per_prompt(trained_lora, tmp_path, capsys):
    args = ["sample", "--model", "builtin:tiny-sdxl", "--lora", trained_lora, "--prompt", "lts_shapes, a red circle",
            "--prompt", "a blue square", "--steps", "2", "--width", "64", "--height", "96", "--seed", "7", "--out", tmp_path]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    paths = [line for line in out.splitlines() if line]
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00-lts-shapes-a-red-circle-seed7.png", "01-a-blue-square-seed7.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (64, 96)


def test_sample_refuses_a_missing_lora_and_a_bad_model(tmp_path, capsys):
    code, _, err = run_cli(["sample", "--model", "builtin:tiny-sdxl", "--lora", tmp_path / "x.safetensors", "--prompt", "a"], capsys)
    assert code == 2 and err.strip() == f"error: --lora: file not found: {tmp_path / 'x.safetensors'}"
    code, _, err = run_cli(["sample", "--model", "./nowhere", "--prompt", "a"], capsys)
    assert code == 2 and "--model: no such file or folder" in err


def test_sample_refuses_a_lora_for_another_model(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    name = "lora_unet_output_blocks_11_1_transformer_blocks_0_attn1_to_q"  # beyond the tiny UNet's blocks
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 64), f"{name}.lora_up.weight": torch.zeros(64, 4), f"{name}.alpha": torch.tensor(4.0)}, tmp_path / "other.safetensors")
    code, _, err = run_cli(["sample", "--model", "builtin:tiny-sdxl", "--lora", tmp_path / "other.safetensors", "--prompt", "a", "--steps", "1"], capsys)
    assert code == 1
    assert f"module {name} does not exist in this model" in err and "Traceback" not in err


def test_sample_refuses_a_file_that_is_not_a_lora(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 16)
    code, _, err = run_cli(["sample", "--model", "builtin:tiny-sdxl", "--lora", tmp_path / "x.safetensors", "--prompt", "a"], capsys)
    assert code == 1 and "cannot read this LoRA file" in err
