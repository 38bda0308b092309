"""One adapted module's weights in the layout the file stores them, and the translation to and from PEFT's layers.

The file layout is kohya's and LyCORIS': `lora_down.weight` / `lora_up.weight` (LoRA, LoCon, DyLoRA) plus
`dora_scale` (DoRA), `hada_w1_a` ... `hada_w2_b` (LoHa), `lokr_w1` or `lokr_w1_a/_b` with `lokr_w2` or
`lokr_w2_a/_b` (LoKr), each with its alpha. PEFT keeps the same tensors under other names and shapes; this
module is the only place that knows both.

Two differences are folded here rather than spread through the code:
- DoRA's magnitude: PEFT [out] (linear) or [1, out, 1, 1] (conv); the file [out, 1] or [out, 1, 1, 1].
- LoKr's scale: PEFT scales every LoKr by alpha / r, while LyCORIS, ComfyUI and A1111 use 1 when both Kronecker
  factors are full matrices (no rank to divide by). For such a module alpha / r is folded into `lokr_w1`
  and the file's alpha is r, so every reader computes the same update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from lora_trainer.adapters.lora import layer_parameters

LORA_KEYS = ("lora_down.weight", "lora_up.weight")
DORA_KEY = "dora_scale"
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
WEIGHT_KEYS = (*LORA_KEYS, DORA_KEY, *LOHA_KEYS, *LOKR_KEYS)


@dataclass(frozen=True)
class AdapterWeights:
    """One adapted module as the file stores it: tensors by key suffix (`lora_down.weight`, `hada_w1_a`, ...)
    and alpha."""

    tensors: dict[str, torch.Tensor]
    alpha: float

    @property
    def kind(self) -> str:
        """`lora` (LoRA, LoCon, DyLoRA, and DoRA with `dora_scale`), `loha` or `lokr`."""
        if "hada_w1_a" in self.tensors:
            return "loha"
        if any(key.startswith("lokr_") for key in self.tensors):
            return "lokr"
        return "lora"

    @property
    def has_dora(self) -> bool:
        return DORA_KEY in self.tensors

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by; None for a LoKr whose factors are both full (its scale is 1)."""
        if self.kind == "lora":
            return self.tensors["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return self.tensors["hada_w1_b"].shape[0]
        for key in ("lokr_w1_a", "lokr_w2_a"):
            if key in self.tensors:
                return self.tensors[key].shape[1]
        return None

    @property
    def scale(self) -> float:
        """What the update is multiplied by, as every reader of the file computes it."""
        return 1.0 if self.rank is None else self.alpha / self.rank

    @property
    def down(self) -> torch.Tensor:
        return self.tensors["lora_down.weight"]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors["lora_up.weight"]


def lora_weights(down: torch.Tensor, up: torch.Tensor, alpha: float, dora_scale: torch.Tensor | None = None) -> AdapterWeights:
    tensors = {"lora_down.weight": down, "lora_up.weight": up}
    if dora_scale is not None:
        tensors[DORA_KEY] = dora_scale
    return AdapterWeights(tensors=tensors, alpha=float(alpha))


def layer_weights(layer: BaseTunerLayer, adapter_name: str) -> AdapterWeights:
    """The file layout of one adapter of a PEFT layer (detached, on the layer's device and dtype)."""
    if isinstance(layer, LoraLayer):
        return _lora_layer_weights(layer, adapter_name)
    if isinstance(layer, LoHaLayer):
        tensors = {key: getattr(layer, key)[adapter_name].detach() for key in LOHA_KEYS}
        return AdapterWeights(tensors=tensors, alpha=float(layer.alpha[adapter_name]))
    if isinstance(layer, LoKrLayer):
        return _lokr_layer_weights(layer, adapter_name)
    raise TypeError(f"no file layout for PEFT layer {type(layer).__name__}")


def load_layer_weights(layer: BaseTunerLayer, adapter_name: str, weights: AdapterWeights) -> None:
    """Copy file-layout weights into one adapter of a PEFT layer of the same type, rank and shapes, in place
    (the parameters keep their dtype and device); a LoKr takes the file's full or factored layout."""
    with torch.no_grad():
        if isinstance(layer, LoraLayer):
            _load_lora_layer(layer, adapter_name, weights)
        elif isinstance(layer, LoHaLayer):
            for key in LOHA_KEYS:
                _copy(getattr(layer, key)[adapter_name], weights.tensors[key], key)
            layer.scaling[adapter_name] = weights.scale
        elif isinstance(layer, LoKrLayer):
            _load_lokr_layer(layer, adapter_name, weights)
        else:
            raise TypeError(f"no file layout for PEFT layer {type(layer).__name__}")


def _lora_layer_weights(layer: LoraLayer, adapter_name: str) -> AdapterWeights:
    dora_scale = None
    if layer.use_dora.get(adapter_name, False):
        magnitude = layer.lora_magnitude_vector[adapter_name].weight.detach()
        out_features = layer.lora_B[adapter_name].weight.shape[0]
        trailing = (1,) * (layer.lora_A[adapter_name].weight.dim() - 1)
        dora_scale = magnitude.reshape(out_features, *trailing)
    return lora_weights(
        down=layer.lora_A[adapter_name].weight.detach(),
        up=layer.lora_B[adapter_name].weight.detach(),
        alpha=float(layer.lora_alpha[adapter_name]),
        dora_scale=dora_scale,
    )


def _load_lora_layer(layer: LoraLayer, adapter_name: str, weights: AdapterWeights) -> None:
    _copy(layer.lora_A[adapter_name].weight, weights.down, "lora_down.weight")
    _copy(layer.lora_B[adapter_name].weight, weights.up, "lora_up.weight")
    if weights.has_dora != bool(layer.use_dora.get(adapter_name, False)):
        raise ValueError("DoRA weights need a DoRA layer and plain LoRA weights a plain one")
    if weights.has_dora:
        magnitude = layer.lora_magnitude_vector[adapter_name].weight
        _copy(magnitude, weights.tensors[DORA_KEY].reshape(magnitude.shape), DORA_KEY)
    layer.scaling[adapter_name] = weights.scale


def _lokr_layer_weights(layer: LoKrLayer, adapter_name: str) -> AdapterWeights:
    tensors = {key: getattr(layer, key)[adapter_name].detach() for key in LOKR_KEYS if adapter_name in getattr(layer, key)}
    alpha = float(layer.alpha[adapter_name])
    if "lokr_w1" in tensors and "lokr_w2" in tensors:
        tensors["lokr_w1"] = tensors["lokr_w1"] * layer.scaling[adapter_name]
        alpha = float(layer.r[adapter_name])
    return AdapterWeights(tensors=tensors, alpha=alpha)


def _load_lokr_layer(layer: LoKrLayer, adapter_name: str, weights: AdapterWeights) -> None:
    """PEFT's LoKr layer computes with whichever of its factor parameters exist, so the file's layout (which
    factors are full, which are products) is rebuilt as it is rather than derived from a rank and a factor."""
    reference = next(iter(layer_parameters(layer, adapter_name).values()))
    base = layer.get_base_layer().weight
    if lokr_product_shape(weights.tensors) != (base.shape[0], base[0].numel()):
        raise ValueError(f"the Kronecker factors make a {list(lokr_product_shape(weights.tensors))} update, the layer is {list(base.shape)}")
    for key in LOKR_KEYS:
        store = getattr(layer, key)
        if key in weights.tensors:
            tensor = weights.tensors[key].to(reference.device, reference.dtype)
            store[adapter_name] = torch.nn.Parameter(tensor.clone(), requires_grad=reference.requires_grad)
        elif adapter_name in store:
            del store[adapter_name]
    layer.scaling[adapter_name] = weights.scale


def lokr_product_shape(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(out, in * kernel) of the update kron(w1, w2) the factors make."""
    w1 = tensors["lokr_w1"].shape if "lokr_w1" in tensors else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
    if "lokr_w2" in tensors:
        w2 = (tensors["lokr_w2"].shape[0], tensors["lokr_w2"][0].numel())
    else:
        w2 = (tensors["lokr_w2_a"].shape[0], tensors["lokr_w2_b"].shape[1])
    return w1[0] * w2[0], w1[1] * w2[1]


def _copy(parameter: torch.Tensor, tensor: torch.Tensor, key: str) -> None:
    # Singleton dimensions may differ: kohya writes a linear layer's down/up as [r, in, 1, 1] when it was a 1x1 conv.
    if tensor.squeeze().shape != parameter.squeeze().shape:
        raise ValueError(f"{key} has shape {list(tensor.shape)}, the layer needs {list(parameter.shape)}")
    parameter.copy_(tensor.reshape(parameter.shape))
