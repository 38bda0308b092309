"""`lora-train resize`: a LoRA, LoCon or DyLoRA file cut to a lower rank, written as a plain LoRA file.

LoRA and LoCon are cut by SVD (Eckart-Young: the truncated SVD is the closest rank-N update in Frobenius
norm), the method of kohya's networks/resize_lora.py, with kohya's alpha: alpha / rank is kept, so each cut
module's alpha becomes alpha * N / r. DyLoRA is cut by keeping its first N ranks, which its training taught to
work alone (Valipour et al. 2023), with the alpha that keeps their effect (`dylora_alpha`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lora_trainer.adapters.dylora import dylora_alpha
from lora_trainer.adapters.weights import AdapterWeights, lora_weights
from lora_trainer.errors import UserError
from lora_trainer.export.lora_file import LoraFile, cast_tensors, read_lora_file, save_lora_file

DYLORA_MODULE = "networks.dylora"
LYCORIS_MODULE = "lycoris.kohya"
_REFUSED_KINDS = {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


@dataclass(frozen=True)
class ResizedModule:
    weights: AdapterWeights
    relative_error: float  # ||old update - new update||_F / ||old update||_F; 0 where nothing was dropped


@dataclass(frozen=True)
class ResizeResult:
    output: Path
    source_rank: int  # the largest rank of any module in the source file
    rank: int
    dylora: bool  # cut by keeping the first ranks (DyLoRA), else by SVD
    modules: int
    modules_cut: int
    largest_error: tuple[float, str]  # (relative Frobenius error, module name), SVD only

    def summary(self) -> str:
        """The one line the command prints."""
        cut = f"{self.modules_cut} of {self.modules} modules cut"
        if self.dylora:
            return f"wrote {self.output}: DyLoRA rank {self.source_rank} cut to a rank-{self.rank} LoRA, {cut}"
        error, name = self.largest_error
        return f"wrote {self.output}: rank {self.source_rank} -> {self.rank} by SVD, {cut}, largest relative error {error:.3g} ({name})"


def default_output(source: Path, rank: int) -> Path:
    return source.with_name(f"{source.stem}-rank{rank}.safetensors")


def resize_lora_file(source: Path, rank: int, output: Path | None = None, overwrite: bool = False) -> ResizeResult:
    """Cut the LoRA, LoCon or DyLoRA file `source` to `rank` and write it (atomically) to `output`, by default
    `<stem>-rank<N>.safetensors` beside it. Modules whose rank is at most `rank` are copied unchanged."""
    if rank < 1:
        raise UserError(f"--rank {rank}: the rank must be 1 or more")
    output = output or default_output(source, rank)
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; give --overwrite to replace it, or --output another file")
    lora = read_lora_file(source)
    refuse_unresizable(lora, source)
    source_rank = max(weights.rank for weights in lora.weights.values())
    if rank >= source_rank:
        raise UserError(f"{source} is already rank {source_rank}; give a --rank below it")
    unit = dylora_unit(lora.metadata)
    if unit is not None and rank % unit:
        raise UserError(f"--rank {rank}: {source} is a DyLoRA trained in units of {unit}; give a multiple of {unit}")
    cut = {name: cut_module(weights, rank, dylora=unit is not None) for name, weights in lora.weights.items()}
    tensors = file_tensors({name: module.weights for name, module in cut.items()}, stored_dtype(source))
    save_lora_file(output, tensors, resized_metadata(lora.metadata, source.name, source_rank, rank, dylora=unit is not None))
    worst = max(cut, key=lambda name: cut[name].relative_error)
    return ResizeResult(
        output=output, source_rank=source_rank, rank=rank, dylora=unit is not None, modules=len(cut),
        modules_cut=sum(1 for weights in lora.weights.values() if weights.rank > rank),
        largest_error=(cut[worst].relative_error, worst),
    )


def refuse_unresizable(lora: LoraFile, source: Path) -> None:
    """LoHa, LoKr and DoRA have no rank-N truncation that is again a file of their type with the same effect
    (DoRA's magnitude normalises the whole update), so they are refused, as the keys or the metadata tell."""
    kind = next((_REFUSED_KINDS[weights.kind] for weights in lora.weights.values() if weights.kind in _REFUSED_KINDS), None)
    kind = kind or next(("DoRA" for weights in lora.weights.values() if weights.has_dora), None)
    kind = kind or lycoris_kind(lora.metadata)
    if kind is not None:
        raise UserError(f"resize cuts LoRA, LoCon and DyLoRA files; {source} is a {kind}")


def lycoris_kind(metadata: Mapping[str, str]) -> str | None:
    """What a `lycoris.kohya` file's metadata names beyond LoRA / LoCon, or None."""
    if metadata.get("ss_network_module") != LYCORIS_MODULE:
        return None
    args = network_args(metadata)
    algo = str(args.get("algo", "lora")).lower()
    if algo == "dora" or str(args.get("dora_wd", "false")).lower() == "true":
        return "DoRA"
    if algo in ("lora", "locon"):
        return None
    return _REFUSED_KINDS.get(algo, f"LyCORIS {algo}")


def network_args(metadata: Mapping[str, str]) -> dict:
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}


def dylora_unit(metadata: Mapping[str, str]) -> int | None:
    """The DyLoRA unit (kohya's `unit` in `ss_network_args`, 1 when absent), or None for a file that is no DyLoRA."""
    if metadata.get("ss_network_module") != DYLORA_MODULE and metadata.get("lora_train_network_type") != "dylora":
        return None
    return int(network_args(metadata).get("unit", 1))


def cut_module(weights: AdapterWeights, rank: int, dylora: bool) -> ResizedModule:
    if weights.rank <= rank:
        return ResizedModule(weights, 0.0)
    if dylora:
        cut = lora_weights(weights.down[:rank], weights.up[:, :rank], dylora_alpha(weights.alpha, weights.rank, rank))
        return ResizedModule(cut, 0.0)
    return svd_cut(weights, rank)


def svd_cut(weights: AdapterWeights, rank: int) -> ResizedModule:
    """The best rank-`rank` approximation of up @ down (conv down flattened to [r, in*k*k]), split as
    U sqrt(S) / sqrt(S) V^T, with alpha * rank / r so the scale alpha / r stays (kohya's resize_lora.py).

    The SVD of the product comes from QR of each factor and the SVD of the small r x r core
    (up = Q_u R_u, down^T = Q_d R_d, so up @ down = Q_u (R_u R_d^T) Q_d^T), in float64, exact and without forming
    the out x in product."""
    down, up = weights.down, weights.up
    q_up, r_up = torch.linalg.qr(up.reshape(up.shape[0], -1).double())
    q_down, r_down = torch.linalg.qr(down.reshape(down.shape[0], -1).double().T)
    u, singular, vh = torch.linalg.svd(r_up @ r_down.T)
    kept = min(rank, singular.numel())
    root = singular[:kept].sqrt()
    new_up = (q_up @ u[:, :kept]) * root
    new_down = root[:, None] * (vh[:kept] @ q_down.T)
    total = float(singular.square().sum())
    dropped = float(singular[kept:].square().sum())
    new = lora_weights(
        down=new_down.float().reshape(kept, *down.shape[1:]),
        up=new_up.float().reshape(up.shape[0], kept, *up.shape[2:]),
        alpha=weights.scale * kept,
    )
    return ResizedModule(new, math.sqrt(dropped / total) if total > 0 else 0.0)


def file_tensors(weights_by_name: Mapping[str, AdapterWeights], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Kohya-format tensors, each module's weights in `dtype` and its alpha a 0-d fp32."""
    weights = cast_tensors({f"{name}.{key}": tensor for name, module in weights_by_name.items() for key, tensor in module.tensors.items()}, dtype)
    alphas = {f"{name}.alpha": torch.tensor(float(module.alpha), dtype=torch.float32) for name, module in weights_by_name.items()}
    return {**weights, **alphas}


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype the file's weights are stored in (read_lora_file hands them over as fp32)."""
    with safe_open(path, framework="pt") as handle:
        key = next(key for key in handle.keys() if not key.endswith(".alpha"))
        return handle.get_tensor(key).dtype


def resized_metadata(metadata: Mapping[str, str], source_name: str, source_rank: int, rank: int, dylora: bool) -> dict[str, str]:
    """The source's metadata with the new dims and alphas, a DyLoRA renamed a plain LoRA (or LoCon), and
    `lora_train_resized_from`; `sshs_model_hash` is recomputed on saving."""
    new = {key: value for key, value in metadata.items() if key not in ("sshs_model_hash", "sshs_legacy_hash")}
    new["ss_network_dim"], alpha = _cut_dim_alpha(metadata.get("ss_network_dim"), metadata.get("ss_network_alpha"), rank, dylora)
    if alpha is not None:
        new["ss_network_alpha"] = alpha
    args = cut_network_args(network_args(metadata), metadata.get("ss_network_alpha"), rank, dylora)
    if dylora:
        new["ss_network_module"] = "networks.lora"
        args.pop("unit", None)
        if "lora_train_network_type" in metadata:
            new["lora_train_network_type"] = "locon" if "conv_dim" in args else "lora"
    if "ss_network_args" in metadata or dylora:
        new["ss_network_args"] = json.dumps(args)
    new["lora_train_resized_from"] = json.dumps({"file": source_name, "rank": source_rank})
    return new


def cut_network_args(args: dict, network_alpha: str | None, rank: int, dylora: bool) -> dict:
    """kohya's `ss_network_args` after the cut: `conv_dim` / `conv_alpha` and each per-block dim above `rank`
    brought down to it, with its alpha rescaled (per-block alphas default to the network's or conv alpha)."""
    cut = dict(args)
    if "conv_dim" in args:
        cut["conv_dim"], conv_alpha = _cut_dim_alpha(args["conv_dim"], args.get("conv_alpha"), rank, dylora)
        if conv_alpha is not None:
            cut["conv_alpha"] = conv_alpha
    for dims_key, alphas_key, default_alpha in (
        ("block_dims", "block_alphas", network_alpha), ("conv_block_dims", "conv_block_alphas", args.get("conv_alpha"))
    ):
        if dims_key in args:
            cut.update(_cut_block_lists(args, dims_key, alphas_key, default_alpha, rank, dylora))
    return cut


def _cut_block_lists(args: dict, dims_key: str, alphas_key: str, default_alpha: str | None, rank: int, dylora: bool) -> dict[str, str]:
    """One comma-separated per-block dims list (and its alphas) after the cut; the alphas only where given or changed."""
    dims = [dim.strip() for dim in str(args[dims_key]).split(",")]
    alphas = [alpha.strip() for alpha in str(args[alphas_key]).split(",")] if alphas_key in args else [default_alpha] * len(dims)
    pairs = [_cut_dim_alpha(dim, alpha, rank, dylora) for dim, alpha in zip(dims, alphas)]
    lists = {dims_key: ",".join(dim for dim, _ in pairs)}
    if all(alpha is not None for _, alpha in pairs) and (alphas_key in args or lists[dims_key] != ",".join(dims)):
        lists[alphas_key] = ",".join(alpha for _, alpha in pairs)
    return lists


def _cut_dim_alpha(dim: str | None, alpha: str | None, rank: int, dylora: bool) -> tuple[str, str | None]:
    """A network's (dim, alpha) as metadata strings after the cut: unchanged where dim is at most `rank`."""
    try:
        old_dim, old_alpha = int(float(dim)), float(alpha if alpha is not None else dim)
    except (TypeError, ValueError):  # absent or kohya's "Dynamic": nothing to scale
        return str(rank), alpha
    if old_dim <= rank:
        return str(old_dim), alpha
    new_alpha = dylora_alpha(old_alpha, old_dim, rank) if dylora else old_alpha * rank / old_dim
    return str(rank), str(new_alpha)
