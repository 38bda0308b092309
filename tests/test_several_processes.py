"""Two training processes on the CPU (gloo), checked against one process with the same global batch.

The working command for several CPU processes is torchrun; `accelerate launch --cpu --num_processes 2`
starts only one process:

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m lora_trainer train CONFIG

Here torchrun launches tests/several_processes_run.py instead of the CLI: the same setup -> fit -> finalize,
but each rank also writes what it saw from inside the run (process count, backend, latents it encoded,
its adapters against the other rank's), which the test then reads.

Two processes of `training.batch_size: 1` train on the same global batches as one process of batch 2,
with the same noise and timesteps per image (they are seeded by the image's place in the epoch), so
the two LoRA files agree up to float rounding (DDP averages the gradients in another order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed

from conftest import REPO, small_raw_config, train_in_process, write_yaml
from several_processes_run import first_batches

STEPS = 6
DRIVER = REPO / "tests" / "several_processes_run.py"
# Measured on 6 steps: max abs weight difference ~1e-6 to 1e-4 (float summation order), losses ~1e-7.
WEIGHT_TOLERANCE = {"rtol": 1e-3, "atol": 5e-4}
LOSS_TOLERANCE = 1e-4

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available, so torchrun cannot start CPU processes",
)


def train_in_two_processes(config: Path, result: Path) -> subprocess.CompletedProcess:
    """torchrun with 2 CPU processes on a free port, in a clean environment (no launcher variables inherited)."""
    env = {key: value for key, value in os.environ.items()
           if key not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(DRIVER), str(config), str(result)]
    return subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def read_lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_gloo_processes_train_like_one_with_the_same_global_batch(tmp_path: Path, tiny_model_path: Path):
    two = small_raw_config(tmp_path / "two")
    two["training"].update(batch_size=1, max_steps=STEPS)
    two["output"].update(save_state_every_n_steps=3)
    config = write_yaml(tmp_path / "two.yaml", two)

    # One after the other: run side by side, the two processes and the reference contend for the CPUs and
    # take far longer (DDP's ranks wait on each other in every backward).
    started = time.monotonic()
    launched = train_in_two_processes(config, tmp_path / "result")
    two_seconds = time.monotonic() - started
    assert launched.returncode == 0, f"torchrun exited {launched.returncode}:\n{launched.stdout[-8000:]}"
    ranks = [json.loads((tmp_path / "result" / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]

    # There really were two processes, on gloo, each its own rank, and DDP wrapped what trains.
    for rank, seen in enumerate(ranks):
        assert seen["rank"] == seen["process_index"] == rank
        assert seen["num_processes"] == seen["world_size"] == 2
        assert seen["backend"] == "gloo"
        assert seen["is_main_process"] == (rank == 0)
        assert set(seen["wrapped"].values()) == {"DistributedDataParallel"}
        assert seen["steps"] == seen["total_steps"] == STEPS
    # Each took its own half of every global batch: rank 0 slot 0, rank 1 slot 1, different images.
    for share_0, share_1 in zip(ranks[0]["first_batches"], ranks[1]["first_batches"]):
        assert [slot for _, slot in share_0] == [0] and [slot for _, slot in share_1] == [1]
    assert [share[0][0] for share in ranks[0]["first_batches"]] != [share[0][0] for share in ranks[1]["first_batches"]]

    # The cache was encoded once, by the main process; the other read it.
    images = ranks[0]["images"]
    assert images == 12
    assert (ranks[0]["latents_encoded"], ranks[0]["latents_reused"]) == (images, 0)
    assert (ranks[1]["latents_encoded"], ranks[1]["latents_reused"]) == (0, images)

    # The adapters trained and stayed bit-identical across the ranks.
    assert ranks[0]["adapter_change"] > 0
    assert ranks[0]["adapter_digest"] == ranks[1]["adapter_digest"]
    assert ranks[0]["max_difference_to_ranks"] == ranks[1]["max_difference_to_ranks"] == [0.0, 0.0]
    assert ranks[0]["train_losses"] == ranks[1]["train_losses"]  # the loss logged is the mean over the ranks

    # One process of batch 2 is the same training: the same global batches, noise and timesteps.
    one = small_raw_config(tmp_path / "one")
    one["training"].update(batch_size=2, max_steps=STEPS)
    started = time.monotonic()
    run, one_file = train_in_process(one)
    one_seconds = time.monotonic() - started
    assert run.accelerator.num_processes == 1
    assert run.data.latents.encoded == images  # its own cache, not the two processes'
    # Its batches are the two ranks' shares put together, slot by slot.
    assert first_batches(run, 3) == [share_0 + share_1 for share_0, share_1 in zip(ranks[0]["first_batches"], ranks[1]["first_batches"])]

    two_file = Path(ranks[0]["lora_file"])
    assert two_file == tmp_path / "two" / "out" / "test_lora.safetensors" and two_file.is_file()
    two_weights, one_weights = read_lora(two_file), read_lora(one_file)
    assert two_weights.keys() == one_weights.keys()
    weight_difference = max(float((two_weights[key] - one_weights[key]).abs().max()) for key in one_weights)
    for key in one_weights:
        torch.testing.assert_close(two_weights[key], one_weights[key], **WEIGHT_TOLERANCE, msg=lambda message, key=key: f"{key}: {message}")

    two_history = json.loads((tmp_path / "two" / "out" / "test_lora-history.json").read_text(encoding="utf-8"))
    one_history = json.loads((tmp_path / "one" / "out" / "test_lora-history.json").read_text(encoding="utf-8"))
    assert len(two_history["train_losses"]) == len(one_history["train_losses"]) == STEPS
    loss_difference = max(abs(a - b) for a, b in zip(two_history["train_losses"], one_history["train_losses"]))
    assert loss_difference < LOSS_TOLERANCE, (two_history["train_losses"], one_history["train_losses"])
    print(
        f"\ntwo processes (torchrun): {two_seconds:.1f} s, one process: {one_seconds:.1f} s; "
        f"max weight difference {weight_difference:.2e}, max loss difference {loss_difference:.2e}"
    )

    # The state of step 3, saved by two processes, resumes on one with the same global batch (1 x 2 = 2 x 1).
    import shutil

    from accelerate.state import AcceleratorState, GradientState

    from lora_trainer.config.load import parse_config
    from lora_trainer.fit.train import train

    shutil.copytree(tmp_path / "two" / "out", tmp_path / "resumed" / "out")
    resumed = {**one, "output": {**one["output"], "dir": str(tmp_path / "resumed" / "out")}}
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed_file = train(parse_config(resumed), resume=str(tmp_path / "resumed" / "out" / "states" / "test_lora-step000003"))
    resumed_weights = read_lora(resumed_file)
    for key in one_weights:
        torch.testing.assert_close(resumed_weights[key], one_weights[key], **WEIGHT_TOLERANCE, msg=lambda message, key=key: f"{key}: {message}")


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path, tiny_model_path: Path):
    """The stop request is shared each step: a signal to rank 1 alone still stops rank 0 (which writes the state),
    and no rank waits forever for one that left the loop."""
    import re
    import signal

    raw = small_raw_config(tmp_path)
    raw["training"].update(batch_size=1, max_steps=200)
    config = write_yaml(tmp_path / "c.yaml", raw)
    env = {key: value for key, value in os.environ.items() if key not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lora_trainer", "train", str(config)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    for line in launcher.stdout:
        seen.append(line)
        if line.startswith("training: "):
            break
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    rank_1 = next(pid for pid in map(int, children) if "RANK=1" in Path(f"/proc/{pid}/environ").read_text(errors="replace").split("\0"))
    os.kill(rank_1, signal.SIGINT)
    rest, _ = launcher.communicate(timeout=240)
    output = "".join(seen) + rest
    stops = re.findall(r"stopped by Ctrl-C after step (\d+) of 200", output)
    assert len(stops) == 2 and stops[0] == stops[1], output[-4000:]  # both ranks, the same step
    step = int(stops[0])
    assert (tmp_path / "out" / "states" / f"test_lora-step{step:06d}" / "state.json").is_file()
    assert (tmp_path / "out" / f"test_lora-step{step:06d}.safetensors").is_file()
