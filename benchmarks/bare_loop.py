"""The floor a trainer's step is measured against: a UNet LoRA step and nothing else.

    python benchmarks/bare_loop.py MODEL_FOLDER --steps 25 --resolution 256 --batch-size 2 --rank 4

Loads the UNet of a diffusers SDXL folder, puts PEFT LoRA adapters on kohya's default UNet modules (the
linears of the transformer blocks, the same list lora-train uses), and runs `--steps` steps of forward, MSE
loss on a noised latent, backward, AdamW (foreach kernels) and `zero_grad(set_to_none=True)` on tensors made
once before the loop: latents, text context, pooled embedding, time_ids. No clipping, logging, data loader or
caption encoding. It deliberately imports nothing from lora_trainer, so it cannot share the trainer's costs.

Prints one line, `bare: N adapted modules, M adapter parameters, peak GPU memory X GiB` (GPU only), after the
steps; time it as a whole process (benchmarks/speed.py does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# kohya's default UNet targets: these leaf names inside the UNet's transformer blocks.
TARGET_NAMES = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def adapted_module_names(unet: torch.nn.Module) -> list[str]:
    return [
        name for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and name.endswith(TARGET_NAMES) and ".attentions." in f".{name}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a diffusers SDXL folder (its unet/ is used)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--mixed-precision", choices=sorted(DTYPES), default="no")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    arguments = parser.parse_args()

    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[arguments.mixed_precision]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(arguments.model / "unet", torch_dtype=dtype).to(device)
    unet.requires_grad_(False)
    names = adapted_module_names(unet)
    lora = LoraConfig(r=arguments.rank, lora_alpha=arguments.rank / 2, target_modules=names, init_lora_weights="gaussian")
    inject_adapter_in_model(lora, unet)
    parameters = [parameter for name, parameter in unet.named_parameters() if "lora_" in name]
    for parameter in parameters:  # adapters train in fp32 on a half-precision base
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    if arguments.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling, as in training

    latent_side, batch, config = arguments.resolution // 8, arguments.batch_size, unet.config
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    latents = torch.randn(batch, config.in_channels, latent_side, latent_side, device=device)
    context = torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(batch, pooled_width, device=device, dtype=dtype)
    side = float(arguments.resolution)
    time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * batch, device=device, dtype=dtype)
    # SDXL's scaled-linear schedule, to noise the latents as training does.
    alphas_cumprod = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device=device) ** 2, dim=0)

    for _ in range(arguments.steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        signal = alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        noisy = signal * latents + (1 - signal**2).sqrt() * noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = unet(
                noisy.to(dtype), timesteps, encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    final_loss = loss.item()  # the one host sync, after the timed work

    figures = {"modules": len(names), "adapter_parameters": sum(p.numel() for p in parameters), "loss": final_loss}
    if device.type == "cuda":
        figures["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print("bare:", json.dumps(figures))


if __name__ == "__main__":
    main()
