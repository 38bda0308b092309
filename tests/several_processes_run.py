"""One rank of a multi-process training run, for tests/test_several_processes.py; launched by torchrun:

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/several_processes_run.py CONFIG RESULT

It trains through the real pipeline in this process (setup -> fit -> finalize, as `lora-train train` does,
without claiming the output folder) and writes what it saw from inside the run to `RESULT/rank<r>.json`:
the process count as Accelerate and torch.distributed see it, the backend, how many latents this rank
encoded and reused, the first global batches' share this rank trained on, and how far its adapters are
from every other rank's after training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import torch


def adapter_vector(run) -> torch.Tensor:
    """Every trainable adapter parameter of every trained part, flattened into one float32 vector, in module order."""
    from lora_trainer.adapters.wiring import trainable_parameters

    pieces = []
    for part in sorted(run.trained):
        model = run.accelerator.unwrap_model(run.trained[part])
        pieces += [parameter.detach().float().flatten().cpu() for parameter in trainable_parameters(model)]
    return torch.cat(pieces)


def first_batches(run, count: int) -> list[list[list[int]]]:
    """This rank's share of the first `count` global batches of epoch 1: [item index, slot] per example."""
    sampler = copy.copy(run.dataloader.batch_sampler)
    sampler.resume_point = None
    sampler.set_epoch(1)
    shares = []
    for keys in sampler:
        shares.append([[key.index, key.slot] for key in keys])
        if len(shares) == count:
            break
    return shares


def main(config_path: str, result_dir: str) -> None:
    import torch.distributed as dist

    from lora_trainer.config.load import load_config
    from lora_trainer.fit.loop import fit
    from lora_trainer.fit.save import finalize
    from lora_trainer.fit.setup import setup

    run = setup(load_config(Path(config_path)))
    accelerator = run.accelerator
    try:
        before = adapter_vector(run)
        shares = first_batches(run, 3)
        fit(run)
        path = finalize(run)

        mine = adapter_vector(run)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        differences = [float((other - mine).abs().max()) for other in gathered]
        record = {
            "rank": dist.get_rank(),
            "process_index": accelerator.process_index,
            "is_main_process": accelerator.is_main_process,
            "num_processes": accelerator.num_processes,
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "device": str(accelerator.device),
            "distributed_type": str(accelerator.distributed_type),
            "wrapped": {part: type(model).__name__ for part, model in run.trained.items()},
            "latents_encoded": run.data.latents.encoded,
            "latents_reused": run.data.latents.reused,
            "images": len(run.data.items),
            "steps": run.step,
            "total_steps": run.total_steps,
            "first_batches": shares,
            "adapter_values": mine.numel(),
            "adapter_digest": hashlib.sha256(mine.numpy().tobytes()).hexdigest(),
            "adapter_change": float((mine - before).abs().max()),  # training moved them at all
            "max_difference_to_ranks": differences,
            "lora_file": str(path),
            "train_losses": list(run.history.train_losses),
        }
        out = Path(result_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        accelerator.wait_for_everyone()
    finally:
        accelerator.end_training()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: several_processes_run.py CONFIG RESULT_DIR")
    main(sys.argv[1], sys.argv[2])
