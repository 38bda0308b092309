"""The training config: typed, frozen pydantic models validated once, before any model is loaded.

Every field is documented where it is declared; that text is the `--help` of the config reference
(`docs/config.md`, rendered by `lora_trainer.config_reference`). Rules that tie two fields together
live in the model validators here, not in the training code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_trainer.config_errors import format_validation_error
from lora_trainer.errors import ConfigError
from lora_trainer.overrides import apply_overrides
from lora_trainer.yaml_io import load_yaml

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("shapes-sdxl", "tiny-sdxl")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_CAPTION_EXTENSIONS = (".txt", ".caption")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    pretrained: str
    """The SDXL base model: a local diffusers folder, a Hugging Face hub id
    (`stabilityai/stable-diffusion-xl-base-1.0`), or a builtin model with SDXL's layout that is not
    SDXL: `builtin:shapes-sdxl`, tiny and pretrained to draw coloured shapes at 64 px (the quickstart's
    base), or `builtin:tiny-sdxl`, tiny with random weights, built on first use (for tests)."""

    variant: str | None = None
    """Weight variant to download from the hub, e.g. `fp16` for the half-size SDXL files."""

    vae: str | None = None
    """A separate VAE (folder or hub id), e.g. `madebyollin/sdxl-vae-fp16-fix`; default: the model's own."""

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts: `epsilon` (SDXL base and most finetunes) or `v_prediction` (v-pred finetunes)."""

    @field_validator("pretrained")
    @classmethod
    def _check_pretrained(cls, value: str) -> str:
        return check_model_reference(value)

    @field_validator("vae")
    @classmethod
    def _check_vae(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith(BUILTIN_PREFIX):
            raise ValueError(f"must be a folder or a hub id, got {value!r}")
        return check_model_reference(value)


class DatasetConfig(_Section):
    path: Path
    """Folder of training images (png, jpg, jpeg, webp, bmp), each with a caption file of the same stem. A
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

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: Path) -> Path:
        resolved = value.expanduser().resolve()
        if not resolved.is_dir():
            raise ValueError(f"folder not found: {resolved}; give a folder of captioned images")
        return resolved

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
    def caption_varies(self) -> bool:
        """Whether the caption text changes from one epoch to the next (so its embedding cannot be cached)."""
        return self.shuffle_tags or self.tag_dropout > 0


class DataConfig(_Section):
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

    alpha_background: tuple[int, int, int] = (255, 255, 255)
    """RGB colour that transparent pixels are flattened onto."""

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


class NetworkConfig(_Section):
    rank: int = Field(32, gt=0)
    """LoRA rank (kohya's `network_dim`): the width of each adapter."""

    alpha: float = Field(16.0, gt=0)
    """LoRA alpha (kohya's `network_alpha`): adapters are scaled by alpha / rank."""

    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on each adapter's input during training (PEFT's `lora_dropout`; kohya's `network_dropout` acts
    after the down projection instead)."""

    train_unet: bool = True
    """Train adapters on the UNet's attention blocks."""

    train_text_encoder_1: bool = True
    """Train adapters on text encoder 1 (CLIP ViT-L)."""

    train_text_encoder_2: bool = True
    """Train adapters on text encoder 2 (OpenCLIP ViT-bigG)."""

    text_encoder_learning_rate: float | None = Field(None, gt=0)
    """Learning rate of the text-encoder adapters; default: `training.learning_rate`."""

    @model_validator(mode="after")
    def _check_some_part_trains(self) -> NetworkConfig:
        if not (self.train_unet or self.train_text_encoder_1 or self.train_text_encoder_2):
            raise ValueError(
                "train_unet: at least one of train_unet, train_text_encoder_1, train_text_encoder_2 must be true"
            )
        return self

    @property
    def trains_text_encoder(self) -> bool:
        return self.train_text_encoder_1 or self.train_text_encoder_2


class TrainingConfig(_Section):
    epochs: int = Field(10, gt=0)
    """Passes over the dataset (each image counted `repeats` times)."""

    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps; when set, `epochs` is ignored."""

    batch_size: int = Field(1, gt=0)
    """Images per batch on each GPU."""

    gradient_accumulation_steps: int = Field(1, gt=0)
    """Batches whose gradients are summed before each optimizer step."""

    learning_rate: float = Field(1e-4, gt=0)
    """Learning rate of the UNet adapters (and of the text encoders unless set separately)."""

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw` (torch) or `adamw8bit` (bitsandbytes: 8-bit optimizer states, a quarter of AdamW's state memory)."""

    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    epsilon: float = Field(1e-8, gt=0)
    """AdamW epsilon."""

    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    """Learning-rate schedule over the run (diffusers' schedules)."""

    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from 0 to the learning rate."""

    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """`auto`: bf16 on a CUDA GPU that supports it, fp16 on other GPUs, full fp32 on CPU."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less than half the GPU memory, but slower. SDXL's UNet
    at 1024 px, batch 1, bf16 on an H200: peak 14.4 -> 6.8 GiB, 479 -> 1016 ms per step."""

    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the gradient norm of the adapters to this value; 0 turns clipping off."""

    seed: int = 42
    """Seed for adapter initialisation, data order and noise."""

    @field_validator("optimizer", mode="before")
    @classmethod
    def _lowercase_optimizer(cls, value: Any) -> Any:
        # kohya spells them AdamW / AdamW8bit; accept that spelling.
        return value.lower() if isinstance(value, str) else value

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"must be two numbers in [0, 1), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _check_warmup_has_a_schedule(self) -> TrainingConfig:
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError(
                f"lr_warmup_steps: {self.lr_warmup_steps} warmup steps need a schedule that warms up; "
                "set lr_scheduler to constant_with_warmup (or another schedule)"
            )
        return self


class OutputConfig(_Section):
    dir: Path = Path("output")
    """Folder for the LoRA files, the resolved config and the TensorBoard logs."""

    name: str = "lora"
    """File name of the LoRA, without extension."""

    save_every_n_epochs: int | None = Field(None, gt=0)
    """Also save `<name>-<epoch, six digits>.safetensors` every this many epochs (`mylora-000002.safetensors`)."""

    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    """Precision of the saved LoRA weights; fp16 halves the file and is what UIs expect."""

    @field_validator("dir")
    @classmethod
    def _resolve_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(r"[\w.+-]+", value) or value.startswith("."):
            raise ValueError(f"must be a plain file name (letters, digits, _ . + -), got {value!r}")
        return value


class SampleConfig(_Section):
    prompts: list[str] = []
    """Prompts to draw during training; each may end with kohya's inline options, e.g.
    `ohwx, portrait --n blurry --d 7 --w 832 --h 1216 --l 6 --s 30 --ss euler_a`. Sampling is off without prompts."""

    prompts_file: Path | None = None
    """A text file of prompts, one per line with the same inline options (`#` comments, blank lines skipped)."""

    every_n_epochs: int | None = Field(1, gt=0)
    """Draw the prompts after every this many epochs (and after the last)."""

    every_n_steps: int | None = Field(None, gt=0)
    """Also draw them every this many optimizer steps."""

    before_training: bool = True
    """Draw them once before the first step too: the base model's baseline, to compare epochs against."""

    sampler: str = "euler"
    """euler, euler_a, dpm++_2m, dpm++_2m_karras or ddim (A1111 names like `DPM++ 2M Karras` are accepted)."""

    steps: int = Field(25, gt=0)
    """Denoising steps per image."""

    cfg_scale: float = Field(7.0, ge=0)
    """Classifier-free guidance scale."""

    negative_prompt: str = ""
    """Negative prompt for prompts without `--n`."""

    seed: int = 0
    """Seed of each prompt without `--d`; the same at every epoch, so images compare across epochs."""

    width: int | None = Field(None, gt=0)
    """Image width; default: the training resolution."""

    height: int | None = Field(None, gt=0)
    """Image height; default: the training resolution."""

    @field_validator("sampler")
    @classmethod
    def _check_sampler(cls, value: str) -> str:
        from lora_trainer.samplers import canonical_sampler

        return canonical_sampler(value)

    @field_validator("width", "height")
    @classmethod
    def _check_size(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, value: list[str]) -> list[str]:
        from lora_trainer.prompts import parse_prompt_line

        for index, line in enumerate(value):
            try:
                parse_prompt_line(line, f"prompt {index + 1}")
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("prompts_file")
    @classmethod
    def _check_prompts_file(cls, value: Path | None) -> Path | None:
        from lora_trainer.prompts import read_prompts_file

        if value is None:
            return None
        resolved = value.expanduser().resolve()
        try:
            read_prompts_file(resolved)
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return resolved

    def prompt_specs(self, resolution: int) -> list:
        """Every prompt (config list, then file) with this section's defaults filled in."""
        from lora_trainer.prompts import PromptSpec, gather_prompts

        defaults = PromptSpec(
            prompt="",
            negative_prompt=self.negative_prompt,
            width=self.width or resolution,
            height=self.height or resolution,
            seed=self.seed,
            guidance_scale=self.cfg_scale,
            steps=self.steps,
            sampler=self.sampler,
        )
        return gather_prompts(self.prompts, self.prompts_file, "sample.prompts: prompt", defaults)

    @property
    def enabled(self) -> bool:
        return bool(self.prompts or self.prompts_file)


class ValidationConfig(_Section):
    fraction: float = Field(0.0, ge=0, lt=1)
    """Hold out this fraction of the training images (chosen from the seed) to measure a validation loss."""

    path: Path | None = None
    """Or a separate folder of captioned images to measure it on."""

    every_n_epochs: int = Field(1, gt=0)
    """Measure after every this many epochs (and before training, and after the last epoch)."""

    timesteps: list[int] = [100, 300, 500, 700, 900]
    """The fixed timesteps the loss is measured at; with fixed noise, every measurement is comparable."""

    seed: int = 0
    """Seed of the fixed noise."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        resolved = value.expanduser().resolve()
        if not resolved.is_dir():
            raise ValueError(f"folder not found: {resolved}; give a folder of captioned images")
        return resolved

    @field_validator("timesteps")
    @classmethod
    def _check_timesteps(cls, value: list[int]) -> list[int]:
        if not value or not all(0 <= step < 1000 for step in value):
            raise ValueError(f"must be one or more integers in [0, 1000), got {value}")
        return value

    @model_validator(mode="after")
    def _check_one_source(self) -> ValidationConfig:
        if self.fraction and self.path is not None:
            raise ValueError("path: give either fraction or path, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 or self.path is not None


class Config(_Section):
    model: ModelConfig
    """The base model."""

    datasets: list[DatasetConfig] = Field(min_length=1)
    """Image folders to train on (one or more)."""

    data: DataConfig = DataConfig()
    """How images become training latents."""

    network: NetworkConfig = NetworkConfig()
    """The LoRA adapters."""

    training: TrainingConfig = TrainingConfig()
    """Optimisation."""

    output: OutputConfig = OutputConfig()
    """Where results go."""

    sample: SampleConfig = SampleConfig()
    """Images drawn during training, to see when the LoRA is done."""

    validation: ValidationConfig = ValidationConfig()
    """A held-out loss, measured the same way at every evaluation."""

    @model_validator(mode="after")
    def _check_caching_fits_the_data(self) -> Config:
        for index, dataset in enumerate(self.datasets):
            if dataset.random_crop and self.data.cache_latents:
                raise ValueError(
                    f"datasets.{index}.random_crop: a random crop changes every epoch, so it cannot come from the "
                    "latent cache; set data.cache_latents: false (the VAE then encodes every step) or drop random_crop"
                )
        if self.data.cache_text_embeddings:
            if self.network.trains_text_encoder:
                raise ValueError(
                    "data.cache_text_embeddings: a text encoder that trains gives new embeddings every step; set "
                    "network.train_text_encoder_1 and train_text_encoder_2 to false, or cache_text_embeddings to false"
                )
            varying = [index for index, dataset in enumerate(self.datasets) if dataset.caption_varies]
            if varying:
                raise ValueError(
                    f"data.cache_text_embeddings: datasets.{varying[0]} shuffles or drops tags, so its captions change "
                    "every time and cannot be cached; turn off shuffle_tags and tag_dropout, or cache_text_embeddings"
                )
        return self

    @property
    def caches_text_embeddings(self) -> bool:
        """Whether prompt embeddings come from the on-disk cache (explicitly, or by default when possible)."""
        if self.data.cache_text_embeddings is not None:
            return self.data.cache_text_embeddings
        return not self.network.trains_text_encoder and not any(dataset.caption_varies for dataset in self.datasets)

    @property
    def cache_dir(self) -> Path:
        return self.data.cache_dir.expanduser().resolve() if self.data.cache_dir else self.output.dir / "latent_cache"


def check_model_reference(value: str) -> str:
    """Accept a builtin name, an existing folder, or something shaped like a hub id; return it resolved."""
    if value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            allowed = ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_MODELS)
            raise ValueError(f"unknown builtin model {value!r}; builtin models: {allowed}")
        return value
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if _HUB_ID.match(value) and not value.startswith((".", "/", "~")):
        return value
    raise ValueError(f"not a folder, a hub id (owner/name) or a builtin model: {value!r}")


def load_config(path: Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `--set key=value` overrides, and validate it; raise ConfigError if bad."""
    raw = read_yaml_mapping(path)
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, Config, source)) from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model:, datasets:, ...)")
    return raw


def dump_config(config: Config) -> str:
    """The config as YAML with every default filled in, as saved beside each LoRA."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
