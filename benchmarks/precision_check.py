"""How far a half-precision LoRA training step lands from the fp32 one: loss and adapter gradients.

    python benchmarks/precision_check.py                                   # builtin:shapes-sdxl, 64 px
    python benchmarks/precision_check.py --model sdxl-random --resolution 1024 --batch-size 2

For bf16 and fp16 it takes the UNet step the trainer takes in that precision (frozen weights stored in
it, adapters in fp32, autocast; fp16's loss scaled by 2^16 as GradScaler starts) on the same latents,
noise, timesteps, conditioning and adapter weights as an fp32 step, and prints the loss's relative
error and the adapter gradient's cosine and relative error against fp32. Timesteps are spread evenly
over [0, 1000) so every noise level is in the batch. The adapters' up matrices get small random values
(the trainer starts them at zero) so that the down matrices have gradients too.
`builtin:shapes-sdxl` has trained weights and real text embeddings; `sdxl-random` is SDXL's UNet with
random weights and random conditioning, for the numerics of SDXL's sizes. A GPU job: on CPUs, bf16 is
slow and fp16 autocast is not what the trainer does.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from train_step import build_unet  # noqa: E402

from lora_trainer.adapters.lora import UNET_TARGETS, lora_parameters  # noqa: E402
from lora_trainer.adapters.attach import attach_lora  # noqa: E402
from lora_trainer.fit.step import training_step  # noqa: E402
from lora_trainer.model.precision import WEIGHT_DTYPES  # noqa: E402

FP16_LOSS_SCALE = 2.0**16  # GradScaler's initial scale


@dataclass
class Comparison:
    precision: str
    loss: float
    loss_error: float  # |loss - loss_fp32| / loss_fp32
    gradient_cosine: float
    gradient_error: float  # |g - g_fp32| / |g_fp32|
    finite: bool


@dataclass
class Setup:
    unet: torch.nn.Module
    scheduler: object
    batch: dict
    context: torch.Tensor
    pooled: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def shapes_setup(device: torch.device, batch_size: int) -> Setup:
    """builtin:shapes-sdxl with real caption embeddings of its own prompts."""
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.model.conditioning import encode_token_ids, tokenize
    from lora_trainer.model.parts import load_sdxl

    import shapes

    parts = load_sdxl(ModelConfig(pretrained="builtin:shapes-sdxl"))
    unet = parts.unet.to(device, torch.float32)
    text = parts.text
    # Colour and shape cycle at different periods, so 12 samples hold all 12 pretraining prompts.
    captions = [shapes.caption(shapes.BASE_COLOURS[i % 4], shapes.SHAPES[i % 3]) for i in range(batch_size)]
    with torch.no_grad():
        context, pooled = encode_token_ids(
            text.text_encoder_1.float(), text.text_encoder_2.float(),
            tokenize(text.tokenizer_1, captions), tokenize(text.tokenizer_2, captions),
        )
    return _setup(unet, parts.noise_scheduler, context.to(device), pooled.to(device), unet.config.sample_size, shapes.SIZE, device)


def sdxl_random_setup(device: torch.device, batch_size: int, resolution: int) -> Setup:
    unet, scheduler, context_width, pooled_width = build_unet("sdxl-random", device)
    generator = torch.Generator(device="cpu").manual_seed(1)
    context = torch.randn(batch_size, 77, context_width, generator=generator).to(device)
    pooled = torch.randn(batch_size, pooled_width, generator=generator).to(device)
    return _setup(unet, scheduler, context, pooled, resolution // 8, resolution, device)


def _setup(unet, scheduler, context, pooled, latent_size: int, pixels: int, device: torch.device) -> Setup:
    batch_size = context.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(2)
    latents = torch.randn(batch_size, 4, latent_size, latent_size, generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.linspace(0, 999, batch_size).round().long().to(device)
    time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch_size, dtype=torch.float32)
    unet.requires_grad_(False)
    attach_lora(unet, UNET_TARGETS, 16, 8)
    with torch.no_grad():
        for parameter in lora_parameters(unet):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    batch = {"latents": latents, "captions": [""] * batch_size, "time_ids": time_ids}
    return Setup(unet, scheduler, batch, context, pooled, noise, timesteps)


def step_gradient(setup: Setup, precision: str) -> tuple[float, torch.Tensor]:
    """(loss, all adapter gradients as one fp64 vector, so the comparison adds no rounding) of one step in `precision`."""
    dtype = WEIGHT_DTYPES[precision]
    device = setup.batch["latents"].device
    context, pooled = setup.context.to(dtype), setup.pooled.to(dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=precision != "no"):
        loss = training_step(setup.unet, lambda _captions: (context, pooled), setup.scheduler, setup.batch, setup.noise, setup.timesteps)
    scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    (loss * scale).backward()
    parameters = lora_parameters(setup.unet)
    gradient = torch.cat([parameter.grad.double().flatten() / scale for parameter in parameters])
    for parameter in parameters:
        parameter.grad = None
    return loss.item(), gradient


def set_base_precision(unet: torch.nn.Module, base_state: dict, precision: str) -> None:
    """Frozen weights back to their exact fp32 values, then stored in `precision`; adapters stay fp32."""
    unet.to(torch.float32)
    unet.load_state_dict(base_state, strict=False)
    unet.to(WEIGHT_DTYPES[precision])
    for parameter in lora_parameters(unet):
        parameter.data = parameter.data.float()


def compare_precisions(setup: Setup, precisions=("bf16", "fp16")) -> list[Comparison]:
    base_state = {name: value.detach().clone() for name, value in setup.unet.state_dict().items() if "lora_" not in name}
    setup.unet.train()
    reference_loss, reference = step_gradient(setup, "no")
    results = []
    for precision in precisions:
        set_base_precision(setup.unet, base_state, precision)
        loss, gradient = step_gradient(setup, precision)
        results.append(Comparison(
            precision,
            loss,
            abs(loss - reference_loss) / abs(reference_loss),
            torch.nn.functional.cosine_similarity(gradient, reference, dim=0).item(),
            ((gradient - reference).norm() / reference.norm()).item(),
            bool(torch.isfinite(gradient).all()) and torch.isfinite(torch.tensor(loss)).item(),
        ))
    set_base_precision(setup.unet, base_state, "no")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["shapes", "sdxl-random"], default="shapes")
    parser.add_argument("--resolution", type=int, default=1024, help="sdxl-random only (shapes is 64 px)")
    parser.add_argument("--batch-size", type=int, default=16)
    arguments = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # each cast to half precision would warn about float32 modules
    if arguments.model == "shapes":
        setup, what = shapes_setup(device, arguments.batch_size), "shapes-sdxl 64px"
    else:
        setup = sdxl_random_setup(device, arguments.batch_size, arguments.resolution)
        what = f"sdxl-random {arguments.resolution}px"
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    for result in compare_precisions(setup):
        print(
            f"{what} batch {arguments.batch_size} {result.precision} vs fp32 on {where}: loss {result.loss:.5f} "
            f"(error {result.loss_error:.2e}), adapter gradient cosine {result.gradient_cosine:.6f}, "
            f"relative error {result.gradient_error:.2e}, finite {result.finite}"
        )


if __name__ == "__main__":
    main()
