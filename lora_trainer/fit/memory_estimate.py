"""An estimate of a run's peak GPU memory from parameter counts and the config, before anything loads.

The figure stands for `torch.cuda.max_memory_allocated` during training (what the calibration points
measured): the CUDA context and the allocator's cached but unused blocks, which nvidia-smi shows on top,
are not in it. It is the sum of:

- frozen weights: every parameter of the parts on the GPU times the bytes of the base's dtype: 2 in bf16 or
  fp16 (`mixed_precision: auto` is one of them on a GPU), 4 with `mixed_precision: no`. The UNet is always on
  the GPU, the text encoders unless their embeddings are cached (`Config.caches_text_embeddings`, as
  `fit.setup` places them), the VAE in fp32 when latents are not cached. `model.base_precision` fp8 or int8
  keeps the UNet's Linear and Conv weights in 1 byte; nf4 its Linear weights in half a byte plus an fp32 scale
  per 64 weights; every other weight stays in the training dtype.
- adapters: per trained parameter its fp32 weight (4 bytes), its fp32 gradient (4), the optimizer's state
  (`OPTIMIZER_STATE_BYTES`, as `config/training.py` documents them), an fp32 EMA copy (4) when `training.ema`
  is on the GPU, and DDP's gradient bucket (4) with several processes. Adapters that never train (CLIP-L's
  last layer) hold their weight only.
- activations: a coefficient in GiB per image for SDXL's UNet at 1024 px (`ActivationFit`), one with gradient
  checkpointing and one without, times the batch size, times (resolution / 1024)^2, times the UNet's
  activation width relative to SDXL's, times 2 with fp32 activations (`mixed_precision: no`). The width is
  the number of values the UNet's layers output in one forward of a 1024 px image (`model_counts`, counted on
  the meta device): activations grow with channels x positions, which a parameter count (channels^2) does
  not follow; for any UNet of SDXL's layout it is 1. Trained text encoders add the same coefficient scaled by
  their own width at 77 tokens per caption chunk: small, and uncalibrated (no measured point trains them).
- a fixed overhead: the intercept of a least-squares line through the checkpointed points against the
  batch size, where it is not below 0. Today's points put it at -0.03 GiB, i.e. nothing measurable, so none
  is added and the checkpointed coefficient is the least-squares fit through the origin.

The coefficients are fitted to `MEASURED_PEAKS` when this module loads (`fit_activations`): SDXL's UNet
(2.567B parameters) with kohya's 722 default modules at rank 32 (85.1M adapter parameters), text encoders
frozen and cached, 1024 px, on an H200. What the weights and adapters do not explain is the activations:
0.715 GiB per image with checkpointing (from batch 1 and 4), 8.36 GiB without (from the one such point).
Each point is reproduced within 0.5% (tests/test_plan_command.py holds them to 5%).

Not counted, and said so in the plan where it applies: the full-size updates LoHa and LoKr build in every
forward, the VAE's own working memory when it encodes every step (`data.cache_latents: false`) and when
sample images are decoded, and the weights the sample images bring to the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_trainer.config.schema import Config

GIB = 2**30
MIB = 2**20
REFERENCE_RESOLUTION = 1024
# Values SDXL base 1.0's UNet layers output in one forward of one 1024 px image (`model_counts.activation_elements`;
# tests/test_plan_command.py recounts it on the meta device).
SDXL_UNET_ACTIVATION_ELEMENTS = 3_059_692_032
ADAPTER_WEIGHT_BYTES = 4  # fp32, whatever the base's precision (`adapters.attach.make_trainable`)
GRADIENT_BYTES = 4
EMA_BYTES = 4
DDP_BUCKET_BYTES = 4
# Optimizer state per trained parameter, as `config/training.py` documents each optimizer.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8, "adamw8bit": 2, "pagedadamw8bit": 2, "lion": 4, "lion8bit": 1, "prodigy": 16, "adafactor": 0,
    "came": 4, "adamwschedulefree": 8, "sgdnesterov": 4,
}
UNKNOWN_OPTIMIZER_BYTES = 8
QUANTIZED_MATRIX_BYTES = {"fp8": 1.0, "int8": 1.0}
NF4_BYTES = 0.5 + 4 / 64  # 4 bits, and an fp32 scale per block of 64 weights
FULL_PRECISION_BASES = {"fp32": 4, "no": 4, "bf16": 2, "fp16": 2}
TEXT_ENCODERS = ("text_encoder_1", "text_encoder_2")


@dataclass(frozen=True)
class PartCounts:
    """One part of the model, counted without its weights (`model_counts`)."""

    parameters: int
    matrix_weights: int  # weights of its Linear and Conv2d layers: what an fp8 or int8 base keeps in one byte
    linear_weights: int  # weights of its Linear layers: what an nf4 base quantizes
    activation_elements: int  # values its layers output in one forward: a 1024 px image (UNet), 77 tokens (a trained text encoder)
    adapter_parameters: int = 0  # trainable adapter parameters the config's network puts on it (0: it does not train)
    frozen_adapter_parameters: int = 0  # adapters that are in the file but never train (CLIP-L's last layer)
    adapted_weights: int = 0  # weights of the modules that get an adapter


@dataclass(frozen=True)
class ModelCounts:
    unet: PartCounts
    text_encoder_1: PartCounts
    text_encoder_2: PartCounts
    vae_parameters: int
    source: str = ""  # where the configs came from, for the plan's output

    def part(self, name: str) -> PartCounts:
        return getattr(self, name)


@dataclass(frozen=True)
class MemorySettings:
    """What the peak depends on besides the model; `memory_settings` reads them from a config."""

    batch_size: int
    resolution: int
    mixed_precision: str  # auto, bf16, fp16 or no
    gradient_checkpointing: bool
    optimizer: str
    trained_parts: tuple[str, ...] = ("unet",)
    base_precision: str = "auto"
    text_encoders_on_gpu: bool = False
    vae_on_gpu: bool = False
    ema_on_gpu: bool = False
    processes: int = 1
    caption_chunks: int = 1  # data.max_token_length / 75
    network_type: str = "lora"
    draws_samples: bool = False
    # Only for the advice over a limit:
    accumulation: int = 1
    text_encoders_could_cache: bool = True  # freezing them would cache their embeddings (no tag shuffle, no explicit false)
    base_precision_field: bool = False  # the config has model.base_precision

    @property
    def activation_factor(self) -> float:
        return 2.0 if self.mixed_precision == "no" else 1.0


@dataclass(frozen=True)
class MemoryTerm:
    label: str
    bytes: float
    detail: str


@dataclass(frozen=True)
class MemoryEstimate:
    terms: tuple[MemoryTerm, ...]
    not_counted: tuple[str, ...]

    @property
    def total(self) -> float:
        return sum(term.bytes for term in self.terms)

    @property
    def total_gib(self) -> float:
        return self.total / GIB


@dataclass(frozen=True)
class MeasuredPeak:
    """One run's measured `torch.cuda.max_memory_allocated`: SDXL's UNet with kohya's default modules at rank 32,
    text encoders frozen and cached."""

    batch_size: int
    mixed_precision: str
    optimizer: str
    gradient_checkpointing: bool
    gib: float
    resolution: int = 1024
    source: str = "benchmarks/results.md, 2026-11-26, H200"

    @property
    def settings(self) -> MemorySettings:
        return MemorySettings(self.batch_size, self.resolution, self.mixed_precision, self.gradient_checkpointing, self.optimizer)


MEASURED_PEAKS = (
    MeasuredPeak(1, "bf16", "adamw8bit", gradient_checkpointing=True, gib=6.27),
    MeasuredPeak(1, "bf16", "adamw", gradient_checkpointing=True, gib=6.75),
    MeasuredPeak(1, "fp16", "adamw", gradient_checkpointing=True, gib=6.75),
    MeasuredPeak(4, "bf16", "adamw8bit", gradient_checkpointing=True, gib=8.45),
    MeasuredPeak(1, "bf16", "adamw", gradient_checkpointing=False, gib=14.41),
)

# SDXL base 1.0 as the measured runs had it (`model_counts.count_model` gives these; the test checks that).
SDXL_RANK32_UNET = ModelCounts(
    unet=PartCounts(
        parameters=2_567_463_684, matrix_weights=2_565_880_320, linear_weights=2_232_647_680,
        activation_elements=SDXL_UNET_ACTIVATION_ELEMENTS, adapter_parameters=85_114_880, adapted_weights=2_207_744_000,
    ),
    text_encoder_1=PartCounts(parameters=123_060_480, matrix_weights=84_934_656, linear_weights=84_934_656, activation_elements=10_821_888),
    text_encoder_2=PartCounts(parameters=694_659_840, matrix_weights=630_784_000, linear_weights=630_784_000, activation_elements=47_605_760),
    vae_parameters=83_653_863,
    source="SDXL base 1.0",
)


@dataclass(frozen=True)
class ActivationFit:
    checkpointed_gib: float  # per 1024 px image on SDXL's UNet
    unchecked_gib: float
    overhead_gib: float

    def per_image_gib(self, checkpointing: bool) -> float:
        return self.checkpointed_gib if checkpointing else self.unchecked_gib


def estimate_peak_memory(counts: ModelCounts, settings: MemorySettings) -> MemoryEstimate:
    """The peak GPU memory of a training step with `settings` on a model of `counts`, term by term."""
    return _estimate(counts, settings, ACTIVATIONS)


def memory_settings(config: Config, processes: int = 1) -> MemorySettings:
    """The settings of a config that the estimate depends on."""
    training, data = config.training, config.data
    base_precision = getattr(config.model, "base_precision", None) or "auto"
    return MemorySettings(
        batch_size=training.batch_size,
        resolution=data.resolution,
        mixed_precision=training.mixed_precision,
        gradient_checkpointing=training.gradient_checkpointing,
        optimizer=training.optimizer,
        trained_parts=tuple(config.part_learning_rates),
        base_precision=str(base_precision).lower(),
        text_encoders_on_gpu=not config.caches_text_embeddings,
        vae_on_gpu=not data.cache_latents,
        ema_on_gpu=training.ema.enabled and not training.ema.on_cpu,
        processes=processes,
        caption_chunks=data.max_token_length // 75,
        network_type=config.network.type,
        draws_samples=config.sample.enabled,
        accumulation=training.gradient_accumulation_steps,
        text_encoders_could_cache=data.cache_text_embeddings is not False and not any(d.caption_varies for d in config.datasets),
        base_precision_field="base_precision" in type(config.model).model_fields,
    )


def fit_activations(peaks=MEASURED_PEAKS, counts: ModelCounts = SDXL_RANK32_UNET) -> ActivationFit:
    """The activation coefficients and fixed overhead that best reproduce `peaks` (see the module docstring)."""
    none = ActivationFit(0.0, 0.0, 0.0)

    def residual_and_images(peak: MeasuredPeak) -> tuple[float, float]:
        settings = peak.settings
        rest = _estimate(counts, settings, none).total / GIB
        return peak.gib - rest, settings.batch_size * (settings.resolution / REFERENCE_RESOLUTION) ** 2 * settings.activation_factor

    checkpointed = [residual_and_images(peak) for peak in peaks if peak.gradient_checkpointing]
    slope, intercept = _line(checkpointed)
    if intercept < 0:
        slope, intercept = sum(r * x for r, x in checkpointed) / sum(x * x for _, x in checkpointed), 0.0
    unchecked = [residual_and_images(peak) for peak in peaks if not peak.gradient_checkpointing]
    unchecked_gib = sum((r - intercept) / x for r, x in unchecked) / len(unchecked)
    return ActivationFit(slope, unchecked_gib, intercept)


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope and intercept of (y, x) points."""
    mean_x = sum(x for _, x in points) / len(points)
    mean_y = sum(y for y, _ in points) / len(points)
    spread = sum((x - mean_x) ** 2 for _, x in points)
    slope = sum((x - mean_x) * (y - mean_y) for y, x in points) / spread
    return slope, mean_y - slope * mean_x


def _estimate(counts: ModelCounts, settings: MemorySettings, fit: ActivationFit) -> MemoryEstimate:
    dtype_bytes = 4 if settings.mixed_precision == "no" else 2
    dtype_name = "fp32" if dtype_bytes == 4 else ("bf16 or fp16" if settings.mixed_precision == "auto" else settings.mixed_precision)
    terms = [_unet_weights(counts.unet, settings.base_precision, dtype_bytes, dtype_name)]
    if settings.text_encoders_on_gpu:
        parameters = counts.text_encoder_1.parameters + counts.text_encoder_2.parameters
        where = "trained" if any(part in settings.trained_parts for part in TEXT_ENCODERS) else "not cached"
        terms.append(MemoryTerm(
            "text encoder weights", parameters * dtype_bytes, f"{_count(parameters)} parameters x {dtype_bytes} bytes ({dtype_name}; {where}, so on the GPU)"
        ))
    if settings.vae_on_gpu:
        terms.append(MemoryTerm(
            "VAE weights", counts.vae_parameters * 4, f"{_count(counts.vae_parameters)} parameters x 4 bytes (fp32; data.cache_latents: false)"
        ))
    terms.append(_adapters(counts, settings))
    factor = settings.activation_factor
    per_image = fit.per_image_gib(settings.gradient_checkpointing)
    pixels = (settings.resolution / REFERENCE_RESOLUTION) ** 2
    width = counts.unet.activation_elements / SDXL_UNET_ACTIVATION_ELEMENTS
    how = "with" if settings.gradient_checkpointing else "without"
    fp32 = " x 2 (fp32)" if factor != 1 else ""
    terms.append(MemoryTerm(
        "activations", per_image * GIB * settings.batch_size * pixels * width * factor,
        f"{settings.batch_size} x {per_image:.3f} GiB per 1024 px image {how} gradient checkpointing x "
        f"({settings.resolution} / 1024)^2 x {_ratio(width)} SDXL's UNet width{fp32}",
    ))
    trained_encoders = [part for part in TEXT_ENCODERS if part in settings.trained_parts]
    if trained_encoders:
        elements = sum(counts.part(part).activation_elements for part in trained_encoders) * settings.caption_chunks
        terms.append(MemoryTerm(
            "text encoder activations", per_image * GIB * settings.batch_size * elements / SDXL_UNET_ACTIVATION_ELEMENTS * factor,
            f"{settings.caption_chunks * 77} tokens per caption, scaled as the UNet's (uncalibrated)",
        ))
    if fit.overhead_gib:
        terms.append(MemoryTerm("fixed overhead", fit.overhead_gib * GIB, "fitted to the measured points"))
    return MemoryEstimate(tuple(terms), tuple(_not_counted(counts, settings)))


def _unet_weights(unet: PartCounts, base_precision: str, dtype_bytes: int, dtype_name: str) -> MemoryTerm:
    parameters = unet.parameters
    if base_precision in QUANTIZED_MATRIX_BYTES:
        rest = parameters - unet.matrix_weights
        size = unet.matrix_weights * QUANTIZED_MATRIX_BYTES[base_precision] + rest * dtype_bytes
        return MemoryTerm(
            "UNet weights", size,
            f"{_count(unet.matrix_weights)} Linear/Conv weights x 1 byte ({base_precision}) + {_count(rest)} others x {dtype_bytes} bytes",
        )
    if base_precision == "nf4":
        rest = parameters - unet.linear_weights
        size = unet.linear_weights * NF4_BYTES + rest * dtype_bytes
        return MemoryTerm(
            "UNet weights", size,
            f"{_count(unet.linear_weights)} Linear weights x {NF4_BYTES:g} bytes (nf4 + scales) + {_count(rest)} others x {dtype_bytes} bytes",
        )
    if base_precision in FULL_PRECISION_BASES:
        dtype_bytes, dtype_name = FULL_PRECISION_BASES[base_precision], f"model.base_precision {base_precision}"
    elif base_precision != "auto":
        dtype_name += f"; model.base_precision {base_precision} is unknown to the estimate"
    return MemoryTerm("UNet weights", parameters * dtype_bytes, f"{_count(parameters)} parameters x {dtype_bytes} bytes ({dtype_name})")


def _adapters(counts: ModelCounts, settings: MemorySettings) -> MemoryTerm:
    trained = sum(counts.part(part).adapter_parameters for part in settings.trained_parts)
    frozen = sum(counts.part(part).frozen_adapter_parameters for part in settings.trained_parts)
    state = OPTIMIZER_STATE_BYTES.get(settings.optimizer, UNKNOWN_OPTIMIZER_BYTES)
    assumed = "" if settings.optimizer in OPTIMIZER_STATE_BYTES else " (assumed)"
    pieces = [f"fp32 weight {ADAPTER_WEIGHT_BYTES}", f"gradient {GRADIENT_BYTES}", f"{settings.optimizer} state {state}{assumed}"]
    per_parameter = ADAPTER_WEIGHT_BYTES + GRADIENT_BYTES + state
    if settings.ema_on_gpu:
        per_parameter += EMA_BYTES
        pieces.append(f"EMA {EMA_BYTES}")
    if settings.processes > 1:
        per_parameter += DDP_BUCKET_BYTES
        pieces.append(f"DDP bucket {DDP_BUCKET_BYTES}")
    detail = f"{_count(trained)} trained parameters x {per_parameter} bytes ({', '.join(pieces)})"
    if frozen:
        detail += f" + {_count(frozen)} that never train x {ADAPTER_WEIGHT_BYTES}"
    return MemoryTerm("adapters", trained * per_parameter + frozen * ADAPTER_WEIGHT_BYTES, detail)


def _not_counted(counts: ModelCounts, settings: MemorySettings) -> list[str]:
    notes = []
    if settings.network_type in ("loha", "lokr"):
        adapted = sum(counts.part(part).adapted_weights for part in settings.trained_parts)
        extent = "a checkpointed block's share of" if settings.gradient_checkpointing else "up to"
        notes.append(
            f"network.type {settings.network_type} builds each adapted layer's full update in fp32 in every forward: "
            f"{extent} {_size(adapted * 4)} more"
        )
    if settings.vae_on_gpu:
        notes.append("the VAE's working memory while it encodes each batch (data.cache_latents: false)")
    if settings.draws_samples:
        joining = [] if settings.text_encoders_on_gpu else [counts.text_encoder_1.parameters + counts.text_encoder_2.parameters]
        if not settings.vae_on_gpu:
            joining.append(counts.vae_parameters)
        brought = f"up to {_size(sum(joining) * 4)} of text-encoder and VAE weights join the GPU, and " if joining else ""
        notes.append(f"while sample images are drawn {brought}the VAE decodes")
    return notes


def _size(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= 0.1 * GIB else f"{size / MIB:.1f} MiB"


def _count(number: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= scale:
            return f"{number / scale:.3g}{suffix}"
    return str(number)


def _ratio(width: float) -> str:
    return f"{width:.2f}x" if width >= 0.1 else f"{width:.3f}x"


def format_memory_estimate(estimate: MemoryEstimate, source: str = "") -> str:
    """The estimate as one block of aligned `label  size  how` lines; `source`: where the model's counts came from."""
    rows = [(term.label, _size(term.bytes), term.detail) for term in estimate.terms]
    rows.append(("total", _size(estimate.total), "torch's allocated peak; the CUDA context and cached blocks come on top"))
    label_width = max(len(label) for label, _, _ in rows)
    size_width = max(len(size) for _, size, _ in rows)
    lines = [f"  {label:<{label_width}}  {size:>{size_width}}  {detail}" for label, size, detail in rows]
    if source:
        lines.append(f"  parameters counted on the meta device from {source}")
    if estimate.not_counted:
        lines.append(f"  not counted: {'; '.join(estimate.not_counted)}")
    worst = max(abs(estimate_peak_memory(SDXL_RANK32_UNET, peak.settings).total_gib / peak.gib - 1) for peak in MEASURED_PEAKS)
    lines.append(
        f"  calibrated on {len(MEASURED_PEAKS)} measured SDXL UNet runs ({MEASURED_PEAKS[0].source}), each within "
        f"{worst:.1%}; see docs/guide.md, \"Planning a run\""
    )
    return "GPU memory estimate (peak, per GPU):\n" + "\n".join(lines)


ACTIVATIONS = fit_activations()
