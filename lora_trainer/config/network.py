"""The `network` section: the adapters, their size and which parts of SDXL they train."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lora_trainer.config import block_weights as blocks
from lora_trainer.config.section import Section


NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora", "dylora")
BLOCK_RANK_FIELDS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


class NetworkConfig(Section):
    type: Literal["lora", "locon", "loha", "lokr", "dora", "dylora"] = "lora"
    """The kind of adapter (docs/guide.md, "LoRA types"): `lora` (Hu et al. 2021) on the attention and MLP
    layers; `locon`, LoRA on the UNet's convolutions too; `loha` (LyCORIS' Hadamard product of two low-rank
    pairs, after FedPara); `lokr` (LyCORIS' Kronecker product); `dora` (Liu et al. 2024: LoRA plus a trained
    per-output magnitude; with `conv_rank`, LoCon plus DoRA); `dylora` (Valipour et al. 2023: every rank up to
    `rank` trained at once, so `lora-train resize` can cut the file to any of them)."""

    rank: int = Field(32, gt=0)
    """LoRA rank (kohya's `network_dim`): the width of each adapter."""

    alpha: float = Field(16.0, gt=0)
    """LoRA alpha (kohya's `network_alpha`): adapters are scaled by alpha / rank."""

    conv_rank: int | None = Field(None, gt=0)
    """Rank of the adapters on the UNet's 3x3 convolutions (kohya's `conv_dim`): the ResNet convolutions and the
    down- and upsamplers. Setting it adds those (and, at `rank`, the ResNets' time-embedding layers and 1x1
    shortcuts) as kohya's LoCon does. Default: `rank` for `locon`; the other types adapt no convolution unless
    it is set, and plain `lora` refuses it (use `locon`)."""

    conv_alpha: float | None = Field(None, gt=0)
    """Alpha of the 3x3-convolution adapters (kohya's `conv_alpha`); default: `alpha`, as LyCORIS defaults it
    (kohya's `networks.lora` defaults it to 1: set it to match a kohya LoCon)."""

    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on each adapter's input during training (PEFT's `lora_dropout`; kohya's `network_dropout` acts
    after the down projection instead). Not for `loha` / `lokr`, which have none (LyCORIS neither)."""

    rank_dropout: float = Field(0.0, ge=0, lt=1)
    """Drop each rank of an adapter's output with this probability during training, the kept ones scaled by
    1 / (1 - p) (kohya's `rank_dropout`). For `loha` / `lokr`, LyCORIS' form: output rows of the update."""

    module_dropout: float = Field(0.0, ge=0, lt=1)
    """Skip a whole adapter with this probability at each forward during training (kohya's `module_dropout`)."""

    block_dims: list[int] | None = None
    """Rank per UNet block (kohya's `block_dims`): 23 values in kohya's SDXL block order (BASE, input_blocks
    0-8, middle_block 0-2, output_blocks 0-8, out); 0 leaves a block without adapters. It covers the linear
    layers (and, with convolutions adapted, the time-embedding layers and 1x1 shortcuts). Default: `rank`."""

    block_alphas: list[float] | None = None
    """Alpha per UNet block (kohya's `block_alphas`), 23 values as `block_dims`. Default: `alpha`."""

    conv_block_dims: list[int] | None = None
    """Rank of the 3x3-convolution adapters per UNet block (kohya's `conv_block_dims`), 23 values as
    `block_dims`; 0 leaves a block's convolutions unadapted. Needs convolutions adapted (`locon` or `conv_rank`).
    Default: `conv_rank`."""

    conv_block_alphas: list[float] | None = None
    """Alpha of the 3x3-convolution adapters per UNet block (kohya's `conv_block_alphas`). Default: `conv_alpha`."""

    lokr_factor: int = -1
    """LoKr (`type: lokr`): split each dimension into two factors with the smaller one at most this (LyCORIS'
    `factor`); -1 splits as evenly as possible, the smallest file."""

    lokr_decompose_both: bool = False
    """LoKr: write the smaller Kronecker factor as a low-rank product too (LyCORIS' `decompose_both`)."""

    lokr_full_matrix: bool = False
    """LoKr: keep the larger Kronecker factor a full matrix instead of a rank-`rank` product (LyCORIS'
    `full_matrix`): no rank, so no alpha either (the update's scale is 1)."""

    dylora_unit: int = Field(1, gt=0)
    """DyLoRA (`type: dylora`): the ranks trained are the multiples of this up to `rank` (kohya's `unit`); `rank`
    must be a multiple of it."""

    train_unet: bool = True
    """Train adapters on the UNet's attention blocks."""

    train_text_encoder_1: bool = True
    """Train adapters on text encoder 1 (CLIP ViT-L)."""

    train_text_encoder_2: bool = True
    """Train adapters on text encoder 2 (OpenCLIP ViT-bigG)."""

    text_encoder_learning_rate: float | None = Field(None, ge=0)
    """Learning rate of both text encoders' adapters (kohya's `text_encoder_lr`); default: `training.learning_rate`."""

    text_encoder_1_learning_rate: float | None = Field(None, ge=0)
    """Learning rate of text encoder 1's adapters (CLIP ViT-L); default: `text_encoder_learning_rate`."""

    text_encoder_2_learning_rate: float | None = Field(None, ge=0)
    """Learning rate of text encoder 2's adapters (OpenCLIP ViT-bigG); default: `text_encoder_learning_rate`."""

    down_lr_weight: list[float] | str | None = None
    """Multiply the UNet's learning rate per input block (kohya's `down_lr_weight`): 9 weights for SDXL's
    input_blocks 0..8, shallow to deep, or a curve: `sine`, `cosine`, `linear`, `reverse_linear`, `zeros`,
    each optionally `+x` (e.g. `cosine+.25`: 1.25 down to 0.25). A weight of 0 leaves the block's adapters
    untrained (they stay in the file, unchanged). Default: 1 everywhere."""

    mid_lr_weight: list[float] | None = None
    """Multiply the UNet's learning rate per middle block (kohya's `mid_lr_weight`): 3 weights, for
    middle_block 0 (resnet), 1 (attention), 2 (resnet). Default: 1."""

    up_lr_weight: list[float] | str | None = None
    """Multiply the UNet's learning rate per output block (kohya's `up_lr_weight`): 9 weights for
    output_blocks 0..8, deep to shallow, or a curve as in `down_lr_weight`. Default: 1."""

    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354; kohya's `loraplus_lr_ratio`): the up matrices (`lora_up`)
    learn this many times faster than the down matrices; the paper suggests 16. Default: off (1)."""

    loraplus_unet_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+ ratio of the UNet's adapters (kohya's `loraplus_unet_lr_ratio`); default: `loraplus_lr_ratio`."""

    loraplus_text_encoder_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+ ratio of both text encoders' adapters (kohya's `loraplus_text_encoder_lr_ratio`); default:
    `loraplus_lr_ratio`."""

    scale_weight_norms: float | None = Field(None, gt=0)
    """Max-norm regularisation (kohya's `scale_weight_norms`, after Srivastava et al. 2014): after every optimizer
    step, an adapter whose update (up @ down * alpha / rank) has a Frobenius norm above this is scaled back to it.
    kohya suggests 1 to start. Default: off."""

    init_weights: Path | None = None
    """Start the adapters from this LoRA file's weights (kohya's `--network_weights`) instead of from zero; the
    optimizer and schedule start fresh (this is not a resume). The file must have been trained with the same rank
    and alpha on the same modules: its UNet and text-encoder parts need the matching `train_*` settings on, and
    adapted modules the file lacks start fresh, with a warning. A `.safetensors` file only; pickles are never read."""

    @field_validator("init_weights")
    @classmethod
    def _check_init_weights(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        resolved = value.expanduser().resolve()
        if resolved.suffix.lower() != ".safetensors":
            raise ValueError(f"must be a .safetensors LoRA file (pickles such as .ckpt/.pt are never read), got {resolved}")
        if not resolved.is_file():
            raise ValueError(f"file not found: {resolved}")
        return resolved

    @field_validator(*BLOCK_RANK_FIELDS)
    @classmethod
    def _check_block_ranks(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if value is None:
            return None
        if len(value) != blocks.BLOCK_COUNT:
            raise ValueError(
                f"needs {blocks.BLOCK_COUNT} values, one per SDXL UNet block as kohya counts them (BASE, "
                f"input_blocks 0-8, middle_block 0-2, output_blocks 0-8, out), got {len(value)}"
            )
        dims = info.field_name.endswith("dims")
        if any(item < 0 if dims else item <= 0 for item in value):
            raise ValueError(f"every value must be {'0 or more (0: no adapter)' if dims else 'above 0'}, got {value}")
        return value

    @model_validator(mode="after")
    def _check_type_settings(self) -> NetworkConfig:
        for problem in _type_problems(self):
            raise ValueError(problem)
        return self

    @field_validator("down_lr_weight", "mid_lr_weight", "up_lr_weight", mode="before")
    @classmethod
    def _check_block_weights(cls, value: Any, info: ValidationInfo) -> Any:
        counts = {"down_lr_weight": blocks.INPUT_BLOCKS, "mid_lr_weight": blocks.MIDDLE_BLOCKS, "up_lr_weight": blocks.OUTPUT_BLOCKS}
        return blocks.parse_block_weights(value, counts[info.field_name], presets=info.field_name != "mid_lr_weight")

    @model_validator(mode="after")
    def _check_block_weights_train_something(self) -> NetworkConfig:
        weights = self.unet_block_lr_weights
        if weights is None:
            return self
        field = next(name for name in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") if getattr(self, name) is not None)
        if not self.train_unet:
            raise ValueError(f"{field}: block weights act on the UNet, which does not train; drop them or set network.train_unet: true")
        if not any(weights[blocks.FIRST_INPUT_BLOCK : blocks.OUT_BLOCK]):
            raise ValueError(f"{field}: every UNet block has weight 0, so the UNet trains nothing; set network.train_unet: false instead")
        return self

    @model_validator(mode="after")
    def _check_some_part_trains(self) -> NetworkConfig:
        if not (self.train_unet or self.train_text_encoder_1 or self.train_text_encoder_2):
            raise ValueError(
                "train_unet: at least one of train_unet, train_text_encoder_1, train_text_encoder_2 must be true"
            )
        return self

    @model_validator(mode="after")
    def _check_no_zero_learning_rate(self) -> NetworkConfig:
        # A rate of 0 would keep adapters that never move in the file; not training the part says it plainly.
        for field, parts in (
            ("text_encoder_learning_rate", "train_text_encoder_1: false and train_text_encoder_2: false"),
            ("text_encoder_1_learning_rate", "train_text_encoder_1: false"),
            ("text_encoder_2_learning_rate", "train_text_encoder_2: false"),
        ):
            if getattr(self, field) == 0:
                raise ValueError(f"{field}: a learning rate of 0 trains nothing; to leave a text encoder untrained set network.{parts}")
        return self

    def text_encoder_learning_rate_of(self, part: str, unet_learning_rate: float) -> float:
        """The learning rate of `text_encoder_1` or `text_encoder_2`: its own, else both encoders', else the UNet's."""
        own = self.text_encoder_1_learning_rate if part == "text_encoder_1" else self.text_encoder_2_learning_rate
        for rate in (own, self.text_encoder_learning_rate):
            if rate is not None:
                return rate
        return unet_learning_rate

    @property
    def unet_block_lr_weights(self) -> tuple[float, ...] | None:
        """The 23 per-block factors of the UNet's learning rate, by `model.blocks` index (BASE and out 1, as
        kohya's `get_block_lr_weight` has them), or None when no block weight is set."""
        if self.down_lr_weight is None and self.mid_lr_weight is None and self.up_lr_weight is None:
            return None
        return (
            1.0,
            *_block_weights(self.down_lr_weight, blocks.INPUT_BLOCKS),
            *_block_weights(self.mid_lr_weight, blocks.MIDDLE_BLOCKS),
            *_block_weights(self.up_lr_weight, blocks.OUTPUT_BLOCKS),
            1.0,
        )

    def loraplus_ratio_of(self, part: str) -> float:
        """How many times faster `part`'s up matrices learn than its down matrices (1: LoRA+ off), as kohya:
        the part's own ratio, else `loraplus_lr_ratio`."""
        own = self.loraplus_unet_lr_ratio if part == "unet" else self.loraplus_text_encoder_lr_ratio
        for ratio in (own, self.loraplus_lr_ratio):
            if ratio is not None:
                return ratio
        return 1.0

    @property
    def trains_text_encoder(self) -> bool:
        return self.train_text_encoder_1 or self.train_text_encoder_2

    @property
    def adapts_convolutions(self) -> bool:
        return self.type == "locon" or self.conv_rank is not None

    @property
    def effective_conv_rank(self) -> int:
        return self.conv_rank if self.conv_rank is not None else self.rank

    @property
    def effective_conv_alpha(self) -> float:
        return self.conv_alpha if self.conv_alpha is not None else self.alpha


def _type_problems(network: NetworkConfig) -> list[str]:
    """What does not fit `network.type`, each as one line naming the field and the fix."""
    problems = []
    kind = network.type
    if kind == "lora" and network.conv_rank is not None:
        problems.append("conv_rank: plain LoRA adapts no convolutions; set network.type: locon (LoRA on the convolutions too)")
    if not network.adapts_convolutions:
        for field in ("conv_alpha", "conv_block_dims", "conv_block_alphas"):
            if getattr(network, field) is not None:
                problems.append(f"{field}: no convolution is adapted; set network.conv_rank (or network.type: locon), or drop {field}")
    if kind != "lokr":
        for field, default in (("lokr_factor", -1), ("lokr_decompose_both", False), ("lokr_full_matrix", False)):
            if getattr(network, field) != default:
                problems.append(f"{field}: a LoKr setting, but network.type is {kind}; set network.type: lokr or drop it")
    if kind != "dylora" and network.dylora_unit != 1:
        problems.append(f"dylora_unit: a DyLoRA setting, but network.type is {kind}; set network.type: dylora or drop it")
    if kind == "lokr" and network.lokr_factor in (0, 1):
        problems.append(f"lokr_factor: {network.lokr_factor} splits nothing; give -1 (as even as possible) or a factor of 2 or more")
    if kind == "dylora":
        ranks = [network.rank, *(network.block_dims or []), *([network.effective_conv_rank] if network.conv_rank else []), *(network.conv_block_dims or [])]
        uneven = [rank for rank in ranks if rank % network.dylora_unit]
        if uneven:
            problems.append(f"dylora_unit: every rank must be a multiple of the unit {network.dylora_unit}, {uneven[0]} is not; change rank or dylora_unit")
    if kind in ("loha", "lokr"):
        if network.dropout:
            problems.append(f"dropout: {kind} has no input dropout (LyCORIS neither); use network.rank_dropout or network.module_dropout")
        for field in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            if getattr(network, field) is not None:
                problems.append(f"{field}: LoRA+ speeds up LoRA's up matrices, which {kind} has not; drop it or use lora/locon/dora")
        if network.scale_weight_norms is not None:
            problems.append(f"scale_weight_norms: kohya's max-norm is defined on LoRA's up @ down; drop it for {kind}")
    if any(getattr(network, field) is not None for field in BLOCK_RANK_FIELDS) and not network.train_unet:
        field = next(field for field in BLOCK_RANK_FIELDS if getattr(network, field) is not None)
        problems.append(f"{field}: per-block ranks act on the UNet, which does not train; drop them or set network.train_unet: true")
    conv_ranks = (network.conv_block_dims or [1]) if network.adapts_convolutions else [0]
    if network.block_dims is not None and not any(network.block_dims) and not any(conv_ranks):
        problems.append("block_dims: every UNet block has rank 0, so the UNet trains nothing; set network.train_unet: false instead")
    return problems


def _block_weights(value: list[float] | str | None, count: int) -> list[float]:
    """One `*_lr_weight` setting as `count` factors: 1 when unset, a preset's curve, or the weights given."""
    if value is None:
        return [1.0] * count
    return blocks.preset_weights(value, count) if isinstance(value, str) else list(value)
