"""Which modules of each SDXL part get an adapter, at which rank and alpha: kohya's targets and rules.

- Linear targets (every type): the attention, feed-forward and proj in/out layers of the UNet's transformer
  blocks, and the attention and MLP layers of both text encoders (`UNET_TARGETS`, `TEXT_ENCODER_TARGETS`).
- Convolutions (`network.adapts_convolutions`, kohya's LoCon, sd-scripts networks/lora.py): every ResNet's
  conv1, conv2, time-embedding projection and shortcut, and the down- and upsampler convolutions. kohya's rule
  for their rank: the time-embedding Linears (`emb_layers_1`) and 1x1 shortcuts (`skip_connection`) take the
  network's rank and alpha, only the 3x3 convolutions take `conv_rank` / `conv_alpha`.
- Per-block ranks (kohya's `block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas`) index the UNet
  by kohya's 23 SDXL blocks (`model.blocks`); a rank of 0 leaves the module without an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_trainer.adapters.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS
from lora_trainer.config.network import NetworkConfig
from lora_trainer.model.blocks import unet_block_index

RESNET_CONVOLUTIONS = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
SAMPLER_CONVOLUTIONS = ("downsamplers.0.conv", "upsamplers.0.conv")


@dataclass(frozen=True)
class ModuleSetting:
    rank: int
    alpha: float


def adapter_targets(part: str, model: torch.nn.Module, network: NetworkConfig) -> dict[str, ModuleSetting]:
    """The modules of `model` (the `unet`, `text_encoder_1` or `text_encoder_2`) that get an adapter, by module
    path, with their rank and alpha."""
    if part != "unet":
        return {
            path: ModuleSetting(network.rank, network.alpha)
            for path, module in model.named_modules()
            if _is_linear_target(path, module, TEXT_ENCODER_TARGETS)
        }
    targets = {}
    for path, module in model.named_modules():
        if _is_linear_target(path, module, UNET_TARGETS):
            setting = _block_setting(path, model, network.block_dims, network.block_alphas, network.rank, network.alpha)
        elif network.adapts_convolutions and _is_convolution_target(path, module):
            if _is_3x3(module):
                setting = _block_setting(
                    path, model, network.conv_block_dims, network.conv_block_alphas, network.effective_conv_rank,
                    network.effective_conv_alpha,
                )
            else:
                setting = _block_setting(path, model, network.block_dims, network.block_alphas, network.rank, network.alpha)
        else:
            continue
        if setting.rank > 0:
            targets[path] = setting
    return targets


def _is_linear_target(path: str, module: torch.nn.Module, suffixes: tuple[str, ...]) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(path == suffix or path.endswith(f".{suffix}") for suffix in suffixes)


def _is_convolution_target(path: str, module: torch.nn.Module) -> bool:
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return False
    in_resnet = ".resnets." in path and path.rsplit(".", 1)[-1] in RESNET_CONVOLUTIONS
    return in_resnet or path.endswith(SAMPLER_CONVOLUTIONS)


def _is_3x3(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _block_setting(
    path: str, unet: torch.nn.Module, dims: list[int] | None, alphas: list[float] | None, rank: int, alpha: float
) -> ModuleSetting:
    if dims is None and alphas is None:
        return ModuleSetting(rank, alpha)
    block = unet_block_index(path, unet.config)
    return ModuleSetting(dims[block] if dims is not None else rank, alphas[block] if alphas is not None else alpha)
