"""Learning happens: the denoising loss on the training latents, at fixed noise and timesteps, drops.

Settings (written here so the test states what it checks): the tiny random SDXL-shaped model,
the 12 example images at 128 px, LoRA rank 8 / alpha 8 on the UNet and both text encoders, AdamW at
lr 1e-2 with a cosine schedule, batch 4, 200 steps, fp32. The loss is measured over all 12 images with 4 fixed noise draws
and timesteps each, before and after training. Required: at least 5% lower for each of 3 seeds, and
at least 10% lower in the median.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import MIXED_SHAPES

from lora_trainer.config.load import parse_config
from lora_trainer.fit.loader import collate
from lora_trainer.fit.loop import fit
from lora_trainer.fit.objective import draw_noise_and_timesteps
from lora_trainer.fit.setup import setup
from lora_trainer.fit.step import training_step

pytestmark = pytest.mark.learning
SEEDS = (0, 1, 2)
STEPS = 200


@torch.no_grad()
def fixed_noise_loss(run, draws: int = 4) -> float:
    """Mean loss over every training image, with noise and timesteps from a fixed generator."""
    for model in run.trained.values():
        model.eval()
    dataset = run.dataloader.dataset
    examples = [dataset[(index, 0)] for index in range(len(dataset))]  # epoch 0: never a training epoch
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(draws):
        for start in range(0, len(examples), 4):
            batch = collate(examples[start : start + 4])
            noise, timesteps = draw_noise_and_timesteps(batch["latents"], 1000, generator)
            losses.append(training_step(run.unet, run.encode_captions, run.noise_scheduler, batch, noise, timesteps).item())
    return sum(losses) / len(losses)


def relative_drop(seed: int, tmp_path) -> float:
    config = parse_config(
        {
            "model": {"pretrained": "builtin:tiny-sdxl"},
            "datasets": [{"path": str(MIXED_SHAPES)}],
            "data": {"resolution": 128, "cache_dir": str(tmp_path / "cache")},
            "network": {"rank": 8, "alpha": 8},
            "training": {"max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-2, "lr_scheduler": "cosine",
                         "mixed_precision": "no", "seed": seed},
            "output": {"dir": str(tmp_path / f"out{seed}"), "name": "learn"},
        }
    )
    run = setup(config)
    try:
        before = fixed_noise_loss(run)
        fit(run)
        after = fixed_noise_loss(run)
    finally:
        run.accelerator.end_training()
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    print(f"seed {seed}: loss {before:.4f} -> {after:.4f} ({(before - after) / before:+.1%} drop)")
    return (before - after) / before


def test_loss_drops_for_every_seed(tmp_path):
    drops = [relative_drop(seed, tmp_path) for seed in SEEDS]
    assert all(drop >= 0.05 for drop in drops), drops
    assert statistics.median(drops) >= 0.10, drops
