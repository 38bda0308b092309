"""The latent cache: each image is VAE-encoded once and kept on disk as a small safetensors file.

Everything about *which* file belongs to an image lives in `LatentCache.key`; the rest of the code
only asks `lookup` and `store`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from lora_trainer.config import Config, ModelConfig
from lora_trainer.data.images import CropInfo, load_rgb, resize_and_center_crop, to_model_input
from lora_trainer.data.records import ImageRecord
from lora_trainer.errors import UserError
from lora_trainer.files import write_bytes_atomic
from lora_trainer.progress import progress_bar

CACHE_FORMAT = 1


@dataclass(frozen=True)
class CachedLatent:
    """One image's cached latents (on disk) and the crop SDXL is conditioned on."""

    path: Path
    crop: CropInfo

    def load(self) -> torch.Tensor:
        return load_file(self.path)["latents"]


class LatentCache:
    def __init__(self, folder: Path, encoder_identity: str, resolution: int):
        self.folder = folder
        self.encoder_identity = encoder_identity
        self.resolution = resolution

    def key(self, record: ImageRecord) -> str:
        # The file's size and modification time stand in for its content until content hashing lands.
        status = record.image_path.stat()
        identity = {
            "format": CACHE_FORMAT,
            "image": str(record.image_path),
            "size": status.st_size,
            "mtime_ns": status.st_mtime_ns,
            "resolution": self.resolution,
            "encoder": self.encoder_identity,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def path(self, record: ImageRecord) -> Path:
        return self.folder / f"{self.key(record)}.safetensors"

    def lookup(self, record: ImageRecord) -> CachedLatent | None:
        path = self.path(record)
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata()
            crop = {name: tuple(value) for name, value in json.loads(metadata["crop"]).items()}
            return CachedLatent(path, CropInfo(**crop))
        except (OSError, SafetensorError, KeyError, ValueError, TypeError):
            return None  # absent or unreadable: encode again

    def store(self, record: ImageRecord, latents: torch.Tensor, crop: CropInfo) -> CachedLatent:
        path = self.path(record)
        metadata = {"image": str(record.image_path), "crop": json.dumps(asdict(crop))}
        write_bytes_atomic(path, save({"latents": latents.detach().to("cpu", torch.float32).contiguous()}, metadata))
        return CachedLatent(path, crop)


def cache_latents(config: Config, records: Sequence[ImageRecord], device: torch.device, show_progress: bool = True) -> list[CachedLatent]:
    """Cached latents for `records` under the config's cache folder, encoding what is missing."""
    from lora_trainer.models import load_vae

    cache = LatentCache(config.cache_dir, vae_identity(config.model), config.data.resolution)
    return fill_latent_cache(records, cache, lambda: load_vae(config.model), device, show_progress)


def vae_identity(model: ModelConfig) -> str:
    """Names the VAE that made a latent, so another VAE never reuses it."""
    if model.vae:
        return f"vae={model.vae}"
    reference = model.pretrained
    if reference == "builtin:tiny-sdxl":
        from lora_trainer.builtin import TINY_SDXL_VERSION

        reference += f"-v{TINY_SDXL_VERSION}"
    return f"model={reference};variant={model.variant}"


def fill_latent_cache(
    records: Sequence[ImageRecord],
    cache: LatentCache,
    load_vae: Callable[[], torch.nn.Module],
    device: torch.device,
    show_progress: bool = True,
) -> list[CachedLatent]:
    """Cached latents for every record, encoding (and loading the VAE) only for images not cached yet."""
    found = [cache.lookup(record) for record in records]
    missing = [index for index, entry in enumerate(found) if entry is None]
    if not missing:
        return [entry for entry in found if entry is not None]
    vae = load_vae().to(device, torch.float32)  # SDXL's VAE overflows in fp16
    try:
        for index in progress_bar(missing, desc="caching latents", unit="img", disable=not show_progress):
            found[index] = encode_into_cache(records[index], cache, vae, device)
    finally:
        vae.to("cpu")
    return [entry for entry in found if entry is not None]


@torch.no_grad()
def encode_into_cache(record: ImageRecord, cache: LatentCache, vae: torch.nn.Module, device: torch.device) -> CachedLatent:
    image, crop = resize_and_center_crop(load_rgb(record.image_path), (cache.resolution, cache.resolution))
    pixels = to_model_input(image).unsqueeze(0).to(device, torch.float32)
    # Seeded by the cache key, so the sampled latents do not depend on the order images are cached in.
    generator = torch.Generator(device=device).manual_seed(int(cache.key(record)[:15], 16))
    latents = vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    if not torch.isfinite(latents).all():
        raise UserError(
            f"{record.image_path}: the VAE produced NaN/inf latents; set model.vae to an fp32-safe VAE "
            "(e.g. madebyollin/sdxl-vae-fp16-fix) or check the image"
        )
    return cache.store(record, latents[0], crop)
