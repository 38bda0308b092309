"""The `datasets` entries (which folders, their captions and augmentations) and the `data` section (buckets, caches)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lora_trainer.config.section import Section

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DEFAULT_CAPTION_EXTENSIONS = (".txt", ".caption")


def captioned_folder(value: Path) -> Path:
    """`value` resolved, if it is a folder (of captioned images, as every folder field here holds)."""
    resolved = value.expanduser().resolve()
    if not resolved.is_dir():
        raise ValueError(f"folder not found: {resolved}; give a folder of captioned images")
    return resolved


class DatasetConfig(Section):
    path: Path
    """Folder of training images (png, jpg, jpeg, webp, bmp, gif), each with a caption file of the same stem. A
    folder named kohya-style `10_mychar` means 10 repeats and class tokens `mychar`; a folder that holds
    only such subfolders (kohya's `train_data_dir`) trains each of them with their own repeats."""

    caption_extension: str | None = None
    """Extension of the caption files next to the images; default: `.txt`, else `.caption`."""

    default_caption: str | None = None
    """Caption for images without a caption file; default: the folder's class tokens, else empty."""

    class_tokens: str | None = None
    """Class tokens (e.g. `ohwx woman`) for images without a caption file; default: from a `10_ohwx woman`
    folder name."""

    repeats: int | None = Field(None, gt=0)
    """How many times each image of this folder is seen per epoch (kohya's `num_repeats`); default: the
    number in a `10_name` folder name, else 1."""

    is_reg: bool = False
    """Regularization images (kohya's `reg_data_dir`): each epoch uses as many of them as there are
    training images, and their loss is scaled by `loss_weight`."""

    loss_weight: float = Field(1.0, gt=0)
    """Multiplies the loss of this folder's images (kohya's `prior_loss_weight` for regularization folders)."""

    caption_prefix: str = ""
    """Text put before every caption, e.g. a trigger word; stays first when tags are shuffled."""

    caption_suffix: str = ""
    """Text put after every caption."""

    shuffle_tags: bool = False
    """Shuffle the caption's tags (split on `tag_separator`) every time the image is seen."""

    tag_separator: str = Field(",", min_length=1)
    """What separates the tags of a caption, for `shuffle_tags`, `keep_tokens` and `tag_dropout`."""

    keep_tokens: int = Field(0, ge=0)
    """The first N tags of the caption stay in place when shuffling and are never dropped."""

    caption_dropout: float = Field(0.0, ge=0, le=1)
    """Probability that an image trains with an empty caption (whole caption, prefix and suffix dropped)."""

    tag_dropout: float = Field(0.0, ge=0, lt=1)
    """Probability that each tag (after the first `keep_tokens`) is left out, drawn every time."""

    flip_aug: bool = False
    """Also train on the mirror image (chosen at random each time); both orientations are cached."""

    random_crop: bool = False
    """Crop at a random place in the bucket, changing every epoch, instead of the center; needs
    `data.cache_latents: false`."""

    alpha_mask: bool = False
    """The image's alpha channel is its loss mask (kohya's `alpha_mask`; needs `objective.masked_loss: true`):
    opaque pixels train, transparent ones are ignored, partly transparent ones count partly. The RGB the VAE
    sees is still flattened onto `data.alpha_background`, so both apply: the mask decides where the loss
    counts, the background only colours what the mask hides. An image without an alpha channel trains
    everywhere (a mask of ones, as kohya gives it), with one warning line counting such images."""

    mask_dir: Path | None = None
    """Folder of loss-mask images (kohya's `conditioning_data_dir` under `masked_loss`; needs
    `objective.masked_loss: true`): one per image, of the same file stem and any image extension (`cat.png`'s
    mask is `cat.png`, `cat.jpg`...), at the image's size (checked when the images are scanned); kohya-style
    subfolders are mirrored (`10_cat/a.png` -> `mask_dir/10_cat/a.png`). Read as greyscale: white trains, black
    is ignored, grey counts partly. An image without a mask is an error before anything loads; a mask without
    an image is warned about and unused. OneTrainer keeps `cat-masklabel.png` beside `cat.png`: rename such
    files to `cat.png` in a folder of their own to use them here."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: Path) -> Path:
        return captioned_folder(value)

    @field_validator("mask_dir")
    @classmethod
    def _check_mask_dir(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        resolved = value.expanduser().resolve()
        if not resolved.is_dir():
            raise ValueError(f"folder not found: {resolved}; give the folder of mask images, named as their images")
        return resolved

    @model_validator(mode="after")
    def _check_masks_fit_the_images(self) -> DatasetConfig:
        if self.mask_dir is None:
            return self
        if self.alpha_mask:
            raise ValueError("mask_dir: alpha_mask: true already takes each image's mask from its alpha channel; use one of them")
        if self.mask_dir == self.path:
            raise ValueError("mask_dir: is the image folder itself; keep the masks in a folder of their own, named as their images")
        # Whether each image has its mask is checked before anything loads by `data.masks.check_mask_folders`
        # (the config cannot scan folders: the data package, which does, builds on it).
        return self

    @field_validator("caption_extension")
    @classmethod
    def _check_caption_extension(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\.[\w.-]+", value):
            raise ValueError(f"must be a file extension starting with '.', like '.txt', got {value!r}")
        return value

    @property
    def caption_extensions(self) -> tuple[str, ...]:
        return (self.caption_extension,) if self.caption_extension else DEFAULT_CAPTION_EXTENSIONS

    @property
    def gives_masks(self) -> bool:
        """Whether its images have loss masks (their alpha channel, or a folder of masks)."""
        return self.alpha_mask or self.mask_dir is not None

    @property
    def caption_varies(self) -> bool:
        """Whether the caption text changes from one epoch to the next (so its embedding cannot be cached)."""
        return self.shuffle_tags or self.tag_dropout > 0


class DataConfig(Section):
    resolution: int = Field(1024, gt=0)
    """Training size in pixels: buckets hold about resolution x resolution pixels (square without buckets)."""

    buckets: bool = True
    """Aspect-ratio buckets (kohya's `enable_bucket`): each image trains at the bucket closest to its own
    aspect ratio instead of a square center crop."""

    bucket_step: int = Field(64, gt=0)
    """Bucket sides are multiples of this many pixels (kohya's `bucket_reso_steps`); a multiple of 32."""

    min_bucket_side: int | None = Field(None, gt=0)
    """Smallest bucket side in pixels; images whose shorter side is below it are reported as too small and
    skipped; default: a quarter of the resolution, rounded down to `bucket_step` (256 at 1024)."""

    max_bucket_side: int | None = Field(None, gt=0)
    """Largest bucket side in pixels; default: twice the resolution."""

    bucket_no_upscale: bool = False
    """Never enlarge an image: images smaller than the resolution get a bucket of their own size (rounded
    down to `bucket_step`)."""

    cache_latents: bool = True
    """Encode each image with the VAE once and keep the latents on disk; off, the VAE encodes every step
    (needed for `random_crop`)."""

    cache_text_embeddings: bool | None = None
    """Keep the text encoders' outputs on disk and move the encoders off the GPU; default: on whenever it
    is possible (no text encoder trains, no tag shuffling or tag dropout)."""

    cache_dir: Path | None = None
    """Where cached latents and text embeddings are kept; default: `<output.dir>/latent_cache`. Entries are
    keyed by content, so several configs can share one folder."""

    vae_batch_size: int = Field(4, gt=0)
    """Images encoded together when caching latents."""

    workers: int = Field(0, ge=0)
    """Data-loader worker processes; worth 2-8 with `cache_latents: false`, where images are decoded every step."""

    max_token_length: Literal[75, 150, 225] = 75
    """Caption tokens the text encoders see (kohya's `max_token_length`): 75 is CLIP's own limit; 150 and 225
    encode the caption in 2 or 3 chunks of 75 tokens, each through the encoders on its own, and join them
    (as kohya does); sample prompts are encoded the same way. Longer captions are cut: training lists them
    before it starts."""

    alpha_background: tuple[int, int, int] = (255, 255, 255)
    """RGB colour that transparent pixels are flattened onto. With `datasets.N.alpha_mask: true` the alpha channel is
    also the loss mask: both apply, the mask deciding where the loss counts, this colour only filling what it hides."""

    on_bad_image: Literal["skip", "error"] = "skip"
    """What to do with unreadable or too-small images and non-UTF-8 captions: `skip` (list them and
    train on the rest) or `error` (stop before training)."""

    @field_validator("resolution")
    @classmethod
    def _check_resolution(cls, value: int) -> int:
        if value % 64:
            raise ValueError(f"must be a multiple of 64 (SDXL's UNet needs it), got {value}")
        return value

    @field_validator("bucket_step")
    @classmethod
    def _check_bucket_step(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be a multiple of 32 (SDXL's UNet halves the latents twice), got {value}")
        return value

    @field_validator("max_token_length", mode="before")
    @classmethod
    def _read_token_length(cls, value: object) -> object:
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value  # `--max-token-length 150`

    @field_validator("alpha_background")
    @classmethod
    def _check_background(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= channel <= 255 for channel in value):
            raise ValueError(f"must be three numbers from 0 to 255 (red, green, blue), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _check_bucket_sides(self) -> DataConfig:
        for name in ("min_bucket_side", "max_bucket_side"):
            value = getattr(self, name)
            if value is not None and value % self.bucket_step:
                raise ValueError(f"{name}: must be a multiple of bucket_step ({self.bucket_step}), got {value}")
        if self.smallest_side > self.resolution:
            raise ValueError(f"min_bucket_side: must be at most the resolution ({self.resolution}), got {self.smallest_side}")
        if self.largest_side < self.resolution:
            raise ValueError(f"max_bucket_side: must be at least the resolution ({self.resolution}), got {self.largest_side}")
        return self

    @property
    def smallest_side(self) -> int:
        if self.min_bucket_side is not None:
            return self.min_bucket_side
        return max(self.bucket_step, self.resolution // 4 // self.bucket_step * self.bucket_step)

    @property
    def largest_side(self) -> int:
        return self.max_bucket_side if self.max_bucket_side is not None else 2 * self.resolution

