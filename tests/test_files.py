"""Atomic writes fail in one line and leave the previous file as it was; stale temporaries are cleared; output folders
are checked when the config loads."""

from __future__ import annotations

import errno
import os
import pickle
import re
import subprocess
import sys

import pytest

import lora_trainer.files as files
from lora_trainer.config.locations import check_writable
from lora_trainer.errors import ConfigError, UserError, WriteFailed
from lora_trainer.files import directory_atomic, human_size, remove_stale_temporaries, write_bytes_atomic, write_text_atomic

as_root = pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def fail_after(monkeypatch, written_before: int, error: OSError) -> None:
    """Make files.py's low-level write put `written_before` bytes on disk, then fail with `error`."""
    real = files._write_some
    state = {"left": written_before}

    def write_some(descriptor, chunk):
        if state["left"] <= 0:
            raise error
        count = real(descriptor, chunk[: state["left"]])
        state["left"] -= count
        return count

    monkeypatch.setattr(files, "_write_some", write_some)


def test_a_write_appears_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "lora.safetensors"
    write_bytes_atomic(target, b"x" * 100)
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["lora.safetensors"]


def test_a_full_disk_keeps_the_previous_file_and_says_how_much_space(tmp_path, monkeypatch):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous contents")
    fail_after(monkeypatch, 1000, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(WriteFailed) as raised:
        write_bytes_atomic(target, b"n" * 12_345_678)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write {target}: No space left on device (needed 12.3 MB, ")
    assert re.search(r"\d+(\.\d)? (B|kB|MB|GB) free\)", message)
    assert message.endswith(f"; the previous {target} is unchanged")
    assert isinstance(raised.value, UserError) and raised.value.exit_code == 1
    assert raised.value.path == target and raised.value.needed == 12_345_678 and raised.value.free is not None
    assert target.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_a_quota_failure_on_a_new_file_has_no_unchanged_clause(tmp_path, monkeypatch):
    target = tmp_path / "new.png"
    fail_after(monkeypatch, 0, OSError(errno.EDQUOT, "Disk quota exceeded"))
    with pytest.raises(WriteFailed, match="Disk quota exceeded \\(needed 5 B, .* free\\)$") as raised:
        write_bytes_atomic(target, b"12345")
    assert "unchanged" not in str(raised.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failure_at_fsync_or_rename_also_cleans_up(tmp_path, monkeypatch, step):
    target = tmp_path / "report.html"
    target.write_text("old")

    def fail(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, step, fail)
    with pytest.raises(WriteFailed, match=f"^cannot write {re.escape(str(target))}: Input/output error; the previous"):
        write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.html"]


@as_root
def test_an_unwritable_folder_is_one_line(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(WriteFailed) as raised:
            write_bytes_atomic(folder / "lora.safetensors", b"data")
        assert str(raised.value) == f"cannot write {folder / 'lora.safetensors'}: Permission denied"
        assert raised.value.free is None
    finally:
        folder.chmod(0o700)
    assert os.listdir(folder) == []


def test_a_file_in_the_way_of_the_folder_is_one_line(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(WriteFailed, match=f"^cannot write {re.escape(str(tmp_path))}/out/lora.safetensors: "):
        write_bytes_atomic(tmp_path / "out" / "lora.safetensors", b"data")


def test_the_folder_temporary_carries_the_pid_and_becomes_the_folder(tmp_path):
    target = tmp_path / "tiny-sdxl"
    with directory_atomic(target) as staging:
        assert re.fullmatch(rf"\.tiny-sdxl\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", staging.name)
        assert staging.parent == tmp_path and staging.is_dir() and not any(staging.iterdir())
        (staging / "model_index.json").write_text("{}")
    assert (target / "model_index.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["tiny-sdxl"]


def test_an_os_error_in_the_block_names_the_folder_and_cleans_up(tmp_path):
    target = tmp_path / "tiny-sdxl"
    with pytest.raises(WriteFailed, match=f"^cannot write {re.escape(str(target))}: No space left on device \\(.* free\\)$"):
        with directory_atomic(target) as staging:
            (staging / "part").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_a_user_error_in_the_block_passes_through(tmp_path):
    with pytest.raises(UserError, match="^bad weights$") as raised:
        with directory_atomic(tmp_path / "model"):
            raise UserError("bad weights")
    assert not isinstance(raised.value, WriteFailed)
    assert os.listdir(tmp_path) == []


def test_a_failed_final_rename_names_the_folder_and_cleans_up(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(files.os, "rename", fail)
    with pytest.raises(WriteFailed, match="tiny-sdxl: Invalid cross-device link$"):
        with directory_atomic(tmp_path / "tiny-sdxl") as staging:
            (staging / "x").write_text("x")
    assert os.listdir(tmp_path) == []


def test_another_process_s_folder_wins(tmp_path):
    target = tmp_path / "model"
    with directory_atomic(target) as staging:
        (staging / "ours").write_text("ours")
        target.mkdir()
        (target / "theirs").write_text("theirs")
    assert os.listdir(target) == ["theirs"]
    assert os.listdir(tmp_path) == ["model"]


def test_an_unmakeable_folder_temporary_is_one_line(tmp_path):
    (tmp_path / "blocker").write_text("file")
    with pytest.raises(WriteFailed, match=f"^cannot write {re.escape(str(tmp_path))}/blocker/model: "):
        with directory_atomic(tmp_path / "blocker" / "model"):
            raise AssertionError("the block must not run")


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, ours = dead_pid(), os.getpid()
    stale_file = tmp_path / f".lora.safetensors.{dead}.0123abcd.tmp"
    stale_folder = tmp_path / f".tiny-sdxl.{dead}.deadbeef.tmp"
    live_file = tmp_path / f".lora.safetensors.{ours}.0123abcd.tmp"
    live_folder = tmp_path / f".tiny-sdxl.{ours}.deadbeef.tmp"
    user_files = [
        ".hidden.tmp",
        f"notes.{dead}.abcdef12.tmp",
        f".x.{dead}.ABCDEF12.tmp",  # upper-case hex is not ours
        f".x.{dead}.abcdef1.tmp",  # seven hex digits
        f".x.{dead}.abcdef12.tmp.bak",
        f"..{dead}.abcdef12.tmp",  # no name
        "lora.safetensors",
    ]
    stale_file.write_bytes(b"half")
    stale_folder.mkdir()
    (stale_folder / "unet.safetensors").write_bytes(b"half")
    live_file.write_bytes(b"writing")
    live_folder.mkdir()
    for name in user_files:
        (tmp_path / name).write_text("mine")
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == sorted([live_file.name, live_folder.name, *user_files])
    assert remove_stale_temporaries(tmp_path) == 0


def test_stale_temporaries_are_looked_for_down_to_the_given_depth(tmp_path):
    dead = dead_pid()
    name = f".ab12.safetensors.{dead}.0123abcd.tmp"
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "cd").mkdir()
    (tmp_path / "ab" / name).write_bytes(b"")
    (tmp_path / "ab" / "cd" / name).write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "ab")
    assert remove_stale_temporaries(tmp_path) == 0
    assert remove_stale_temporaries(tmp_path, depth=1) == 1  # only ab/, not through the link, not ab/cd/
    assert (tmp_path / "ab" / "cd" / name).exists()
    assert remove_stale_temporaries(tmp_path, depth=2) == 1
    assert remove_stale_temporaries(tmp_path / "missing", depth=1) == 0


def test_a_temporary_left_by_a_killed_write_is_stale_for_the_next_run(tmp_path):
    code = (
        "import os, sys; from pathlib import Path; import lora_trainer.files as f\n"
        "f._write_some = lambda d, c: os._exit(3)\n"
        "f.write_bytes_atomic(Path(sys.argv[1]), b'data')"
    )
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "lora.safetensors")]).returncode == 3
    (left,) = os.listdir(tmp_path)
    assert files.TEMPORARY_NAME.fullmatch(left)
    assert remove_stale_temporaries(tmp_path) == 1 and os.listdir(tmp_path) == []


def test_human_sizes():
    assert [human_size(n) for n in (0, 999, 1000, 12_345, 999_949, 999_960, 12_345_678, 4 * 10**9, 5 * 10**12)] == [
        "0 B", "999 B", "1.0 kB", "12.3 kB", "999.9 kB", "1.0 MB", "12.3 MB", "4.0 GB", "5000.0 GB",
    ]  # fmt: skip


def test_write_failed_survives_pickling(tmp_path):
    error = pickle.loads(pickle.dumps(WriteFailed("cannot write x: full", tmp_path, 10, 2)))
    assert (str(error), error.path, error.needed, error.free) == ("cannot write x: full", tmp_path, 10, 2)


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "y").write_text("file")
    with pytest.raises(ConfigError, match=f"^output.dir: {re.escape(str(tmp_path))}/y is a file, not a folder; choose a folder$"):
        check_writable(tmp_path / "y", "output.dir")


def test_a_folder_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "x").write_text("file")
    with pytest.raises(ConfigError, match=f"^output.dir: {re.escape(str(tmp_path))}/x is a file, so .*/x/y/z cannot be created"):
        check_writable(tmp_path / "x" / "y" / "z", "output.dir")
    assert (tmp_path / "x").read_text() == "file"


@as_root
@pytest.mark.parametrize("below", ["", "new/deeper"])
def test_an_unwritable_folder_is_refused(tmp_path, below):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as raised:
            check_writable(locked / below if below else locked, "data.cache_dir")
    finally:
        locked.chmod(0o700)
    message = str(raised.value)
    assert message.startswith(f"data.cache_dir: {locked}") and "\n" not in message
    assert message.endswith("not writable by this user; choose another folder or fix its permissions")
    assert raised.value.exit_code == 2
    assert os.listdir(locked) == []


def test_fine_folders_pass_and_nothing_is_created(tmp_path):
    check_writable(tmp_path, "output.dir")
    check_writable(tmp_path / "new" / "deeper", "output.dir")
    assert os.listdir(tmp_path) == []


def test_a_dangling_link_is_refused(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="out is a symbolic link to a missing target"):
        check_writable(tmp_path / "out", "output.dir")


def test_a_lora_save_on_a_full_disk_keeps_the_previous_lora_byte_identical(small_lora_file, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    from lora_trainer.export.lora_file import save_lora_file

    target = tmp_path / "mylora.safetensors"
    shutil.copy(small_lora_file, target)
    before = target.read_bytes()
    tensors = {key: value * 2 for key, value in load_file(small_lora_file).items()}
    fail_after(monkeypatch, len(before) // 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(WriteFailed, match=rf"^cannot write {re.escape(str(target))}: No space left on device \(needed .* free\); the previous"):
        save_lora_file(target, tensors, {"ss_output_name": "mylora"})
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["mylora.safetensors"]
