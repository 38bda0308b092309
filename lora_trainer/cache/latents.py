"""The latent cache: each (image, bucket, crop, flip, VAE) is encoded once and kept as a small safetensors file.

The file name is a hash of everything the latents depend on: the image's bytes, how it is cut (its
`CropPlan` and flip), the background transparency is flattened onto, and the VAE's weights and scaling.
Editing an image, changing the resolution or swapping the VAE therefore never reuses a wrong latent,
while unchanged images are never encoded twice, whichever config or run asks. Each file also carries
a checksum of its tensor, so a damaged file is found, reported and encoded again.

Under `objective.masked_loss` an image's entry also holds its loss mask at the latent size (mirrored in the
flipped entry), and the key also names the mask's source (the mask file's hash, or the alpha channel, already
in the image's): editing a mask encodes its image again. Images without a mask keep their keys unchanged.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from lora_trainer.cache.fingerprint import file_digest, module_fingerprint, tensor_digest, text_digest
from lora_trainer.config.schema import Config
from lora_trainer.data.buckets import CropPlan
from lora_trainer.data.images import UnreadableImage, apply_plan, load_rgb, to_model_input
from lora_trainer.data.masks import ALPHA, MASK_FORMAT, latent_mask
from lora_trainer.data.records import BadFile, ImageRecord
from lora_trainer.files import write_bytes_atomic
from lora_trainer.model.vae import non_finite_latents, scale_latents
from lora_trainer.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
ENCODE_DTYPE = torch.float32  # SDXL's VAE overflows in fp16; latents are always encoded and kept in fp32


@dataclass(frozen=True)
class LatentRequest:
    """One picture to encode: an image, cut as planned, flipped or not."""

    record: ImageRecord
    plan: CropPlan
    flip: bool


@dataclass(frozen=True)
class CachedLatent:
    path: Path

    def load(self) -> torch.Tensor:
        return load_file(self.path)["latents"]

    def load_mask(self) -> torch.Tensor:
        """The loss mask [1, h, w] stored with the latents (entries of images with a mask only)."""
        with safe_open(self.path, framework="pt") as handle:
            return handle.get_tensor("loss_mask")


@dataclass
class CacheOutcome:
    """What filling the cache did: the entries found or made, and what it reused, encoded, repaired, skipped."""

    entries: dict[LatentRequest, CachedLatent] = field(default_factory=dict)
    reused: int = 0
    encoded: int = 0
    repaired: list[Path] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.reused} reused", f"{self.encoded} encoded"]
        if self.repaired:
            parts.append(f"{len(self.repaired)} damaged cache files encoded again")
        if self.bad:
            parts.append(f"{len(self.bad)} unreadable images skipped")
        return "latents: " + ", ".join(parts)


class LatentCache:
    """The cached latents of one VAE: where its entries live, how they are keyed, and the VAE that makes them.

    A run opens one, so the VAE's weights are fingerprinted once, when the first key is needed.
    """

    def __init__(self, folder: Path, vae: torch.nn.Module, background: tuple[int, int, int]):
        self.folder = folder
        self.vae = vae
        self.background = tuple(background)

    @cached_property
    def vae_fingerprint(self) -> str:
        return vae_fingerprint(self.vae)

    def key(self, request: LatentRequest, image_digest: str, mask_digest: str | None = None) -> str:
        """`mask_digest`: the mask file's sha256, `ALPHA` for an alpha mask, None for an image without a mask."""
        identity = {
            "format": CACHE_FORMAT,
            "image_sha256": image_digest,
            "plan": asdict(request.plan),
            "flip": request.flip,
            "background": self.background,
            "vae": self.vae_fingerprint,
            "dtype": str(ENCODE_DTYPE),
        }
        if mask_digest is not None:
            # Only keys of masked images change, so caches made before masked loss stay valid.
            identity["loss_mask"] = {"source": mask_digest, "format": MASK_FORMAT}
        return text_digest(json.dumps(identity, sort_keys=True))

    def path(self, key: str) -> Path:
        # Two levels of folders keep directory listings short for datasets of many thousand images.
        return self.folder / key[:2] / f"{key}.safetensors"

    def lookup(self, key: str) -> CachedLatent | None:
        """The valid entry for `key`; None if there is none. A damaged file raises DamagedEntry."""
        path = self.path(key)
        if not path.exists():
            return None
        if not _is_intact(path):
            raise DamagedEntry(path)
        return CachedLatent(path)

    def store(self, key: str, request: LatentRequest, latents: torch.Tensor, mask: torch.Tensor | None = None) -> CachedLatent:
        latents = latents.detach().to("cpu", ENCODE_DTYPE).contiguous()
        metadata = {
            "format": str(CACHE_FORMAT),
            "image": str(request.record.image_path),
            "plan": json.dumps(asdict(request.plan)),
            "flip": str(request.flip),
            "sha256": tensor_digest(latents),
        }
        tensors = {"latents": latents}
        if mask is not None:
            tensors["loss_mask"] = mask.to("cpu", torch.float32).contiguous()
            metadata["mask_sha256"] = tensor_digest(tensors["loss_mask"])
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, save(tensors, metadata))
        return CachedLatent(path)


class DamagedEntry(Exception):
    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def _is_intact(path: Path) -> bool:
    """Whether the file is a whole safetensors file whose tensor still matches the checksum written with it."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
            intact = tensor_digest(handle.get_tensor("latents")) == metadata["sha256"]
            if "mask_sha256" in metadata:
                intact = intact and tensor_digest(handle.get_tensor("loss_mask")) == metadata["mask_sha256"]
    except (OSError, SafetensorError, KeyError, TypeError, ValueError, RuntimeError):
        return False
    return intact


def open_latent_cache(config: Config, vae: torch.nn.Module) -> LatentCache:
    """The latent cache a run with `config` reads and fills with `vae`."""
    return LatentCache(config.cache_dir / "latents", vae, config.data.alpha_background)


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Names the VAE by its weights and the scaling applied to its latents."""
    scaling = {"scaling_factor": vae.config.scaling_factor, "shift_factor": getattr(vae.config, "shift_factor", None)}
    return module_fingerprint(vae, scaling)


def fill_latent_cache(
    requests: Sequence[LatentRequest],
    cache: LatentCache,
    device: torch.device,
    batch_size: int = 4,
    show_progress: bool = True,
) -> CacheOutcome:
    """Find every request in the cache, encoding (in batches of one bucket size) only what is missing."""
    outcome = CacheOutcome()
    missing: dict[tuple[int, int], list[tuple[LatentRequest, str]]] = defaultdict(list)
    digests: dict[Path, str] = {}
    for request in progress_bar(requests, desc="checking latent cache", unit="img", disable=not show_progress, leave=False):
        digest = _image_digest(request.record.image_path, digests, outcome)
        mask = request.record.loss_mask
        mask_digest = None if mask is None else ALPHA if mask.file is None else _image_digest(mask.file, digests, outcome)
        if digest is None or (mask is not None and mask_digest is None):
            continue
        key = cache.key(request, digest, mask_digest)
        try:
            entry = cache.lookup(key)
        except DamagedEntry as damaged:
            outcome.repaired.append(damaged.path)
            entry = None
        if entry is None:
            missing[request.plan.bucket].append((request, key))
        else:
            outcome.entries[request] = entry
            outcome.reused += 1
    for path in outcome.repaired:
        log.warning("damaged latent cache file %s: encoding its image again", path)
    total = sum(len(group) for group in missing.values())
    if total:
        _encode_missing(missing, cache, device, batch_size, outcome, total, show_progress)
    return outcome


def _image_digest(path: Path, digests: dict[Path, str], outcome: CacheOutcome) -> str | None:
    if path not in digests:
        try:
            digests[path] = file_digest(path)
        except OSError as error:
            outcome.bad.append(BadFile(path, f"cannot read this file ({error.strerror or error})"))
            digests[path] = ""
    return digests[path] or None


def _encode_missing(missing, cache: LatentCache, device, batch_size, outcome, total, show_progress) -> None:
    unreadable: set[Path] = {bad.path for bad in outcome.bad}
    vae = cache.vae
    home = next(vae.parameters()).device  # the run shares this VAE: hand it back where it was
    vae.to(device, ENCODE_DTYPE)
    try:
        with progress_bar(total=total, desc="caching latents", unit="img", disable=not show_progress) as bar:
            for group in missing.values():
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    pictures = _load_pictures(chunk, cache.background, unreadable, outcome)
                    if pictures:
                        _encode_batch(pictures, cache, device, outcome)
                    bar.update(len(chunk))
    finally:
        vae.to(home)


def _load_pictures(chunk, background, unreadable: set[Path], outcome: CacheOutcome) -> list[tuple]:
    """(request, key, VAE input, loss mask or None) of each request whose image (and mask) can be read."""
    pictures = []
    for request, key in chunk:
        path = request.record.image_path
        if path in unreadable:
            continue
        try:
            image = load_rgb(path, background, request.plan.resized)
            mask = latent_mask(request.record, request.plan, request.flip) if request.record.loss_mask is not None else None
        except UnreadableImage as error:
            unreadable.add(path)
            outcome.bad.append(BadFile(path, str(error)))
            continue
        pictures.append((request, key, to_model_input(apply_plan(image, request.plan, request.flip)), mask))
    return pictures


@torch.no_grad()
def _encode_batch(pictures, cache: LatentCache, device: torch.device, outcome: CacheOutcome) -> None:
    vae = cache.vae
    pixels = torch.stack([picture for _, _, picture, _ in pictures]).to(device, ENCODE_DTYPE)
    distribution = vae.encode(pixels).latent_dist
    for index, (request, key, _, mask) in enumerate(pictures):
        # Noise seeded by the cache key: a latent does not depend on which images shared its batch.
        generator = torch.Generator(device="cpu").manual_seed(int(key[:15], 16))
        noise = torch.randn(distribution.mean[index].shape, generator=generator).to(device)
        latents = scale_latents(vae, distribution.mean[index] + distribution.std[index] * noise)
        if not torch.isfinite(latents).all():
            raise non_finite_latents(request.record.image_path)
        outcome.entries[request] = cache.store(key, request, latents, mask)
        outcome.encoded += 1
