"""Sample images during training: the same prompts and seeds at every round, so epochs compare side by side.

A round borrows the run's models as they are (adapters active), draws in eval mode without gradients,
and hands everything back as it found it: train/eval modes and devices, the VAE included (a run without
a latent cache encodes with it every step), and no pipeline left on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_trainer.config.schema import Config
from lora_trainer.model.parts import SDXLParts
from lora_trainer.report.history import RunHistory, SampleRecord
from lora_trainer.sampling.generate import Drawing, draw, drawings, generation_info, pipeline_from_parts, slug
from lora_trainer.sampling.png_info import save_png
from lora_trainer.sampling.schedulers import ZERO_TERMINAL_SNR_GUIDANCE_RESCALE, zero_terminal_snr_sampling

SAMPLES_FOLDER = "samples"


class SampleDrawer:
    def __init__(self, config: Config, unet: torch.nn.Module, parts: SDXLParts, device: torch.device, autocast: Callable[[], Any]):
        self.config = config
        self.autocast = autocast  # the training's mixed precision, so adapters (fp32) meet half-precision weights
        self.unet = unet  # unwrapped: the same modules that train, adapters included
        self.text = parts.text
        self.vae = parts.vae
        zero_snr = config.objective.zero_terminal_snr
        self.scheduler = zero_terminal_snr_sampling(parts.noise_scheduler) if zero_snr else parts.noise_scheduler
        self.guidance_rescale = ZERO_TERMINAL_SNR_GUIDANCE_RESCALE if zero_snr else 0.0
        self.device = device
        self.drawings: list[Drawing] = drawings(config.sample.prompt_specs(config.data.resolution))

    def draw_round(self, epoch: int, step: int, history: RunHistory | None, tracker: Any = None) -> list[Path]:
        """Draw every prompt; record the images in `history` (None for the in-between rounds by step)."""
        label = f"e{epoch:06d}" if history is not None else f"step{step:06d}"
        folder = self.config.output.dir / SAMPLES_FOLDER
        paths = []
        with self._borrowed_models() as pipeline:
            for drawing in self.drawings:
                image = draw(pipeline, drawing, self.config.data.max_token_length, self.guidance_rescale)
                path = folder / f"{label}-{drawing.index:02d}-{slug(drawing.spec.prompt)}.png"
                save_png(path, image, generation_info(drawing, self.config.model.pretrained, ((self.config.output.name, 1.0),)))
                paths.append(path)
                if tracker is not None:
                    tracker.add_image(f"samples/{drawing.index:02d}", np.asarray(image), global_step=step, dataformats="HWC")
                if history is not None:
                    relative = str(path.relative_to(self.config.output.dir))
                    history.samples.append(SampleRecord(epoch, step, drawing.index, drawing.spec.prompt, drawing.seed, relative))
        return paths

    @contextmanager
    def _borrowed_models(self) -> Iterator[Any]:
        models = [self.unet, self.text.text_encoder_1, self.text.text_encoder_2, self.vae]
        modes = [model.training for model in models]
        devices = [next(model.parameters()).device for model in models]
        try:
            for model in models:
                model.eval()  # adapter dropout off while drawing
                model.to(self.device)  # text encoders may have left the GPU (cached embeddings), the VAE too
            self.vae.to(torch.float32)  # SDXL's VAE overflows in half precision
            pipeline = pipeline_from_parts(self.unet, self.text, self.vae, self.scheduler)
            with self.autocast():
                yield pipeline
        finally:
            for model, mode, device in zip(models, modes, devices):
                model.train(mode)
                model.to(device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
