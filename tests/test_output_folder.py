"""One run per output folder: a finished run is not replaced silently, a live one is not shared, a killed one leaves
no litter; intermediate saves by step, and only the newest kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import run_cli, write_yaml

from lora_trainer.config.load import parse_config
from lora_trainer.fit.output_folder import LOCK_NAME, lock_folder, release_folders


def test_a_rerun_into_a_finished_run_is_refused_and_overwrite_replaces_it(raw_config, tmp_path, capsys):
    raw_config["output"]["save_every_n_epochs"] = 1
    raw_config["training"]["max_steps"] = 7  # two epochs of 6 steps: one epoch file
    config = write_yaml(tmp_path / "c.yaml", raw_config)
    assert run_cli(["train", config], capsys)[0] == 0
    out = tmp_path / "out"
    assert (out / "test_lora-000001.safetensors").is_file()
    before = (out / "test_lora.safetensors").read_bytes()

    code, _, err = run_cli(["train", config], capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: output.dir {out} already holds run 'test_lora' (2 LoRA files); continue it with --resume latest, "
                          "replace it with --overwrite, or choose another output.dir or output.name")
    assert (out / "test_lora.safetensors").read_bytes() == before

    raw_config["output"]["save_every_n_epochs"] = None
    raw_config["training"]["max_steps"] = 2
    code, _, _ = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config), "--overwrite"], capsys)
    assert code == 0
    assert not (out / "test_lora-000001.safetensors").exists()  # the old run's epoch file is gone with it
    assert (out / "test_lora.safetensors").read_bytes() != before

    code, _, err = run_cli(["train", config, "--overwrite", "--resume", "latest"], capsys)
    assert code == 2 and "--resume continues a run and --overwrite replaces it" in err


def test_a_folder_in_use_by_a_live_run_is_refused_naming_it(raw_config, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from lora_trainer.fit.output_folder import lock_folder; from pathlib import Path; "
         f"lock_folder(Path({str(out)!r})); print('locked', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
        assert code == 1
        assert f"error: output.dir {out} is in use by another lora-train run (pid {holder.pid} on " in err
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the lock with the process: the folder is free again, no stale lock to remove by hand.
    lock_folder(out)
    release_folders()


def test_temporary_files_of_killed_runs_are_removed_and_live_ones_kept(raw_config, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = out / f".test_lora.safetensors.{dead}.0123abcd.tmp"
    stale.write_bytes(b"half a file")
    stale_state = out / "states" / f".test_lora-step000002.{dead}.89abcdef.tmp"
    stale_state.mkdir(parents=True)
    live = out / f".other.safetensors.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"being written")
    raw_config["training"]["max_steps"] = 1
    assert run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)[0] == 0
    assert not stale.exists() and not stale_state.exists() and live.exists()


def test_an_output_folder_that_is_a_file_fails_before_anything_loads(raw_config, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: output.dir:") and "is a file" in err


def test_step_saves_keep_only_the_newest(raw_config, tmp_path, capsys):
    raw_config["training"]["max_steps"] = 9
    raw_config["output"].update(save_every_n_steps=2, keep_saves=2)
    assert run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)[0] == 0
    out = tmp_path / "out"
    assert sorted(path.name for path in out.glob("test_lora*.safetensors")) == [
        "test_lora-step000006.safetensors", "test_lora-step000008.safetensors", "test_lora.safetensors"
    ]


@pytest.mark.parametrize("field", ["save_every_n_steps", "keep_saves", "save_state_every_n_steps", "keep_states"])
def test_save_counts_must_be_positive(raw_config, field):
    raw_config["output"][field] = 0
    with pytest.raises(Exception, match=f"output.{field}"):
        parse_config(raw_config)


def test_the_lock_file_is_the_only_trace_of_a_run_that_failed_at_once(raw_config, tmp_path, capsys):
    raw_config["datasets"][0]["path"] = str(tmp_path / "nothing-here")
    code, _, _ = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 2 and not (tmp_path / "out" / LOCK_NAME).exists()


def test_two_runs_filling_one_cache_at_once_leave_it_whole(raw_config, tmp_path):
    """Each entry is written under a fresh temporary name and renamed: both runs may encode the same image, the
    last rename wins with identical bytes, and neither reads half a file."""
    from lora_trainer.cache.latents import _is_intact

    processes = []
    for index in range(2):
        raw = {**raw_config, "output": {**raw_config["output"], "dir": str(tmp_path / f"out{index}")}}
        config = write_yaml(tmp_path / f"c{index}.yaml", raw)
        processes.append(subprocess.Popen([sys.executable, "-m", "lora_trainer", "cache-latents", str(config)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    entries = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(entries) == 12 and all(_is_intact(entry) for entry in entries)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_every_file_of_a_run_counts_as_the_run_and_others_do_not(tmp_path):
    from lora_trainer.config.output import OutputConfig
    from lora_trainer.fit.output_folder import run_files

    names = [
        "n.safetensors", "n.yaml", "n-000002.safetensors", "n-step000010.safetensors", "n-history.json", "n-loss.png",
        "n-timesteps.png", "n-report.html", "n-report-loss.png", "n-report-grid.png", "n-cut-captions.txt",
    ]
    for name in [*names, "other.safetensors", "n-notes.txt"]:
        (tmp_path / name).write_text("x")
    found = {path.name for path in run_files(OutputConfig(dir=tmp_path, name="n"))}
    assert found == set(names)
