"""Score what a shapes model draws: the share of samples whose colour and shape the classifier confirms.

    python scripts/evaluate_shapes.py --model lora_trainer/model/pretrained/shapes-sdxl        # the 12 prompts
    python scripts/evaluate_shapes.py --model lora_trainer/model/pretrained/shapes-sdxl --lora my.safetensors

The protocol of the example base's README: Euler, 25 steps, CFG 4, seeds 0-15 for each prompt, 64 px.
The 16 seeds of a prompt are drawn as one batch with one generator per seed, which gives each seed the
same starting noise as drawing it alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import shapes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OLD_PROMPTS = [shapes.caption(colour, shape) for colour in shapes.BASE_COLOURS for shape in shapes.SHAPES]
SEEDS = range(16)
# The quickstart's new concept: "zqx" should bring cyan, whatever the shape.
TRIGGER_PROMPTS = [f"a zqx {shape}" for shape in shapes.SHAPES]


def load_pipeline(model_reference: str, loras: Sequence[tuple[Path, float]] = ()):
    """An fp32 CPU pipeline of the model with the LoRAs loaded as adapters."""
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.export.load import load_loras_into
    from lora_trainer.export.lora_file import read_lora_file
    from lora_trainer.model.parts import load_sdxl
    from lora_trainer.sampling.generate import pipeline_from_parts

    parts = load_sdxl(ModelConfig(pretrained=model_reference))
    load_loras_into(parts.lora_targets(), [(read_lora_file(path), weight, str(path)) for path, weight in loras])
    pipeline = pipeline_from_parts(parts.unet, parts.text, parts.vae, parts.noise_scheduler)
    pipeline.to(torch.float32)
    return pipeline


@torch.no_grad()
def draw_batch(pipeline, prompt: str, seeds: Sequence[int] = SEEDS) -> list:
    from lora_trainer.sampling.generate import decode
    from lora_trainer.sampling.schedulers import make_scheduler

    config = pipeline.scheduler.config
    pipeline.scheduler = make_scheduler("euler", config, config.prediction_type)
    latents = pipeline(
        prompt=prompt,
        num_images_per_prompt=len(seeds),
        num_inference_steps=25,
        guidance_scale=4.0,
        width=shapes.SIZE,
        height=shapes.SIZE,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        output_type="latent",
    ).images
    return decode(pipeline, latents)


def share_right(pipeline, prompt: str, colour: str, shape: str | None, seeds: Sequence[int] = SEEDS) -> float:
    """The share of samples with that colour (and that shape, unless None)."""
    verdicts = [shapes.classify(image) for image in draw_batch(pipeline, prompt, seeds)]
    return sum(found_colour == colour and (shape is None or found_shape == shape) for found_colour, found_shape in verdicts) / len(verdicts)


def trigger_cyan_shares(pipeline, seeds: Sequence[int] = SEEDS) -> list[float]:
    """The share of cyan samples for each trigger prompt."""
    return [share_right(pipeline, prompt, "cyan", None, seeds) for prompt in TRIGGER_PROMPTS]


def old_prompt_scores(pipeline, seeds: Sequence[int] = SEEDS) -> dict[str, float]:
    return {prompt: share_right(pipeline, prompt, *prompt.split()[1:], seeds) for prompt in OLD_PROMPTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the shapes model: a diffusers folder made by pretrain_example_base.py")
    parser.add_argument("--lora", type=Path, action="append", default=[])
    arguments = parser.parse_args()
    torch.set_flush_denormal(True)
    pipeline = load_pipeline(arguments.model, [(path, 1.0) for path in arguments.lora])
    scores = old_prompt_scores(pipeline)
    for prompt, score in scores.items():
        print(f"{prompt:24s} {score:6.1%}")
    print(f"{'overall':24s} {sum(scores.values()) / len(scores):6.1%}")
    for prompt, share in zip(TRIGGER_PROMPTS, trigger_cyan_shares(pipeline)):
        print(f"{prompt:24s} {share:6.1%} cyan")


if __name__ == "__main__":
    main()
