"""`lora-train sample` refuses a bad --out or a LoRA weight that is not a number before any model loads."""

from __future__ import annotations

import os

import pytest
from conftest import run_cli

SMALL = ["--steps", "2", "--width", "64", "--height", "64", "--model", "builtin:tiny-sdxl", "--prompt", "a red circle"]


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Every check here must come before the model loads: loading it fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lora_trainer.model.parts.load_sdxl", refuse)
    monkeypatch.setattr("lora_trainer.sampling.generate.load_sdxl", refuse, raising=False)


@pytest.fixture
def lora(tmp_path):
    path = tmp_path / "my.safetensors"
    path.write_bytes(b"not read: the checks come first")
    return path


def refused(capsys, *args) -> str:
    code, out, err = run_cli(["sample", *SMALL, *args], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not out.strip()
    return lines[0]


def test_out_that_is_a_file_is_refused(tmp_path, lora, capsys):
    out = tmp_path / "y.png"
    out.write_bytes(b"")
    line = refused(capsys, "--lora", lora, "--out", out)
    assert line == f"error: --out: {out} is a file, not a folder; give a folder for the images"
    assert out.read_bytes() == b""


def test_out_under_a_file_is_refused(tmp_path, lora, capsys):
    parent = tmp_path / "y.png"
    parent.write_bytes(b"")
    out = parent / "images" / "more"
    line = refused(capsys, "--lora", lora, "--out", out)
    assert line == f"error: --out: {out} is under {parent}, which is a file, not a folder; give a folder for the images"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_out_in_a_folder_that_is_not_writable_is_refused(tmp_path, lora, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = refused(capsys, "--lora", lora, "--out", locked)
        assert line == f"error: --out: {locked} is not writable; give a folder you can write to"
        line = refused(capsys, "--lora", lora, "--out", locked / "new" / "images")
        assert line.startswith(f"error: --out: {locked / 'new' / 'images'} would be made in {locked}, which is not writable")
        assert not (locked / "new").exists()
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("weight", ["nan", "NaN", "inf", "-inf", "infinity"])
def test_a_lora_weight_that_is_not_finite_is_refused(tmp_path, lora, capsys, weight):
    out = tmp_path / "out"
    line = refused(capsys, "--lora", f"{lora}:{weight}", "--out", out)
    assert line == f"error: --lora: the weight of {lora} must be a finite number, like 0.8, got {weight}"
    assert not out.exists()


def test_the_weight_is_checked_before_the_out_folder(tmp_path, lora, capsys):
    out = tmp_path / "y.png"
    out.write_bytes(b"")
    assert refused(capsys, "--lora", f"{lora}:nan", "--out", out).startswith("error: --lora: ")


def test_lora_choice_still_reads_weights_and_colons_in_paths(tmp_path):
    from lora_trainer.config.sample_command import lora_choice

    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(b"")
    assert lora_choice(f"{odd}:0.5").weight == 0.5
    assert lora_choice(str(odd)).path == odd and lora_choice(str(odd)).weight == 1.0
    assert lora_choice(f"{odd}:-1").weight == -1.0


def test_a_folder_the_user_cannot_write_is_refused_whoever_runs_the_tests(tmp_path, lora, capsys, monkeypatch):
    import lora_trainer.config.sample_command as sample_command

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(sample_command.os, "access", lambda path, mode: path != locked)
    line = refused(capsys, "--lora", lora, "--out", locked / "images")
    assert line == f"error: --out: {locked / 'images'} would be made in {locked}, which is not writable; give a folder you can write to"
    assert not (locked / "images").exists()
