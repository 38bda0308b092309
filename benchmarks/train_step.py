"""Speed and memory of one LoRA training step, on the UNet that dominates SDXL training.

    python benchmarks/train_step.py                                  # tiny builtin model, CPU, fp32
    python benchmarks/train_step.py --model sdxl-random --resolution 1024 --mixed-precision bf16 \
        --gradient-checkpointing --optimizer adamw8bit                # SDXL-sized UNet, random weights, GPU

`sdxl-random` builds SDXL base's real UNet architecture with random weights (nothing to download),
so speed and memory are SDXL's; the loss values mean nothing. Conditioning is random tensors of
SDXL's shapes (text encoders frozen and cached, the common setup). Prints one line of figures per run;
record them in benchmarks/results.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_trainer.adapters.lora import UNET_TARGETS, lora_parameters  # noqa: E402
from lora_trainer.adapters.attach import attach_lora  # noqa: E402
from lora_trainer.fit.compile import compile_transformer_blocks  # noqa: E402
from lora_trainer.fit.objective import draw_noise_and_timesteps  # noqa: E402
from lora_trainer.fit.step import training_step  # noqa: E402
from lora_trainer.model.precision import WEIGHT_DTYPES  # noqa: E402
from lora_trainer.model.sdxl_architecture import SDXL_UNET  # noqa: E402


def build_unet(name: str, device: torch.device):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if name == "sdxl-random":
        torch.manual_seed(0)
        with torch.device(device):  # 2.6B random weights initialise in seconds on a GPU, a minute on a CPU
            unet = UNet2DConditionModel(**SDXL_UNET)
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        return unet, scheduler, 2048, 1280
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.model.parts import load_sdxl

    parts = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))
    unet = parts.unet
    return unet, parts.noise_scheduler, unet.config.cross_attention_dim, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sdxl-random"], default="tiny")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    parser.add_argument("--channels-last", action="store_true", help="the UNet's convolution weights channels-last")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks, as training.compile does")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after 3 warmup steps")
    arguments = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = WEIGHT_DTYPES[arguments.mixed_precision]
    unet, scheduler, context_width, pooled_width = build_unet(arguments.model, device)
    unet.requires_grad_(False)
    unet.to(device, dtype)
    attach_lora(unet, UNET_TARGETS, arguments.rank, arguments.rank / 2)
    if arguments.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if arguments.channels_last:
        unet.to(memory_format=torch.channels_last)
    if arguments.compile:
        compile_transformer_blocks(unet, "inductor")
    unet.train()
    parameters = lora_parameters(unet)
    if arguments.optimizer == "adamw8bit":
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(parameters, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=arguments.mixed_precision == "fp16")

    size, batch = arguments.resolution // 8, arguments.batch_size
    latents = torch.randn(batch, 4, size, size, device=device)
    context = torch.randn(batch, 77, context_width, device=device, dtype=dtype)
    pooled = torch.randn(batch, pooled_width, device=device, dtype=dtype)
    time_ids = torch.tensor([[arguments.resolution, arguments.resolution, 0, 0, arguments.resolution, arguments.resolution]] * batch, device=device, dtype=torch.float32)
    batch_data = {"latents": latents, "captions": [""] * batch, "time_ids": time_ids}

    def step() -> float:
        noise, timesteps = draw_noise_and_timesteps(latents, 1000)
        with torch.autocast(device.type, dtype=dtype, enabled=arguments.mixed_precision != "no"):
            loss = training_step(unet, lambda _captions: (context, pooled), scheduler, batch_data, noise, timesteps)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    durations = []
    for _ in range(arguments.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)

    seconds = statistics.median(durations)
    if device.type == "cuda":
        memory = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        where = torch.cuda.get_device_name()
    else:
        memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        where = f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(
        f"{arguments.model} {arguments.resolution}px batch {batch} rank {arguments.rank} {arguments.mixed_precision} "
        f"{arguments.optimizer}{' checkpointing' if arguments.gradient_checkpointing else ''}"
        f"{' channels-last' if arguments.channels_last else ''}{' compiled' if arguments.compile else ''} on {where}: "
        f"{seconds * 1000:.0f} ms/step, {batch / seconds:.2f} images/s, {memory}, "
        f"{sum(p.numel() for p in parameters) / 1e6:.1f}M adapter parameters"
    )


if __name__ == "__main__":
    main()
