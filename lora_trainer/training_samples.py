"""Sample images during training: the same prompts and seeds at every round, so epochs compare side by side.

A round borrows the training models as they are (adapters active), draws in eval mode without
gradients, and hands everything back as it found it: train/eval modes, devices, and no pipeline or
VAE left on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_trainer.config import Config
from lora_trainer.files import write_bytes_atomic
from lora_trainer.history import RunHistory, SampleRecord
from lora_trainer.models import TextEncoders, load_noise_scheduler, load_vae
from lora_trainer.png_info import png_bytes
from lora_trainer.sample import Drawing, draw, drawings, generation_info, pipeline_from_parts, slug

SAMPLES_FOLDER = "samples"


class TrainingSampler:
    def __init__(
        self, config: Config, unet: torch.nn.Module, text: TextEncoders, device: torch.device, autocast: Callable[[], Any]
    ):
        self.config = config
        self.autocast = autocast  # the training's mixed precision, so adapters (fp32) meet half-precision weights
        self.unet = unet  # unwrapped: the same modules that train, adapters included
        self.text = text
        self.device = device
        self.drawings: list[Drawing] = drawings(config.sample.prompt_specs(config.data.resolution))
        self.vae = load_vae(config.model)  # kept on the CPU between rounds
        self.scheduler = load_noise_scheduler(config.model)

    def draw_round(self, epoch: int, step: int, history: RunHistory | None, tracker: Any = None) -> list[Path]:
        """Draw every prompt; record the images in `history` (None for the in-between rounds by step)."""
        label = f"e{epoch:06d}" if history is not None else f"step{step:06d}"
        folder = self.config.output.dir / SAMPLES_FOLDER
        paths = []
        with self._borrowed_models() as pipeline:
            for drawing in self.drawings:
                image = draw(pipeline, drawing)
                path = folder / f"{label}-{drawing.index:02d}-{slug(drawing.spec.prompt)}.png"
                info = generation_info(drawing, self.config.model.pretrained, ((self.config.output.name, 1.0),))
                write_bytes_atomic(path, png_bytes(image, info))
                paths.append(path)
                if tracker is not None:
                    tracker.add_image(f"samples/{drawing.index:02d}", np.asarray(image), global_step=step, dataformats="HWC")
                if history is not None:
                    relative = str(path.relative_to(self.config.output.dir))
                    history.samples.append(SampleRecord(epoch, step, drawing.index, drawing.spec.prompt, drawing.seed, relative))
        return paths

    @contextmanager
    def _borrowed_models(self) -> Iterator[Any]:
        models = [self.unet, self.text.text_encoder_1, self.text.text_encoder_2]
        modes = [model.training for model in models]
        devices = [next(model.parameters()).device for model in models]
        try:
            for model in models:
                model.eval()  # adapter dropout off while drawing
                model.to(self.device)  # text encoders may have left the GPU (cached embeddings)
            self.vae.to(self.device, torch.float32)
            pipeline = pipeline_from_parts(self.unet, self.text, self.vae, self.scheduler)
            with self.autocast():
                yield pipeline
        finally:
            for model, mode, device in zip(models, modes, devices):
                model.train(mode)
                model.to(device)
            self.vae.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
