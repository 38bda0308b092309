"""Every LoRA type trains on the tiny SDXL, its saved file loads back to the same outputs, diffusers consumes the
LoRA and LoCon files, and files of different types stack: their updates add, as computed here from the formulas."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, small_raw_config, train_in_process
from test_lora_interop import _load_capturing_warnings, _outputs, _probe_inputs

from lora_trainer.config.model import ModelConfig
from lora_trainer.export.load import load_loras_into
from lora_trainer.export.lora_file import read_lora_file

KOHYA_LOCON = set(json.loads((REPO / "tests" / "data" / "kohya_sdxl_lora_names.json").read_text())["locon_extra"]["unet"])
TYPES = {
    "lora": {},
    "locon": {"conv_rank": 2, "conv_alpha": 1},
    "dora": {"conv_rank": 2, "conv_alpha": 1},
    "loha": {"conv_rank": 2, "conv_alpha": 1},
    "lokr": {"conv_rank": 2, "conv_alpha": 1},
    "dylora": {"dylora_unit": 2, "rank_dropout": 0.2, "module_dropout": 0.1},
}
KEYS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dylora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
}


@pytest.fixture(scope="module")
def trained_types(tiny_model_path, tmp_path_factory):
    """One short run per type (2 steps at a high rate, so every adapter moves): type -> (file, in-memory models).
    The runs share one latent cache, so only the first encodes the images."""
    results = {}
    cache = tmp_path_factory.mktemp("types-cache")
    for kind, settings in TYPES.items():
        raw = small_raw_config(tmp_path_factory.mktemp(kind))
        raw["data"]["cache_dir"] = str(cache)
        raw["network"].update(type=kind, rank=4, alpha=3, **settings)
        raw["training"].update(learning_rate=2e-2, max_steps=2)
        raw["output"]["name"] = kind
        run, path = train_in_process(raw)
        models = {part: run.accelerator.unwrap_model(model).eval() for part, model in run.trained.items()}
        results[kind] = (path, models)
    return results


def _fresh_parts():
    from lora_trainer.model.parts import load_sdxl

    return load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))


def _parts_outputs(parts) -> dict[str, torch.Tensor]:
    return _outputs(parts.unet, parts.text.text_encoder_1, parts.text.text_encoder_2, _probe_inputs())


@pytest.mark.parametrize("kind", list(TYPES))
def test_the_saved_file_loads_back_to_the_trained_outputs(trained_types, kind):
    path, models = trained_types[kind]
    lora = read_lora_file(path)
    suffixes = {key for weights in lora.weights.values() for key in weights.tensors} | {"alpha"}
    if kind == "lokr":
        assert {"lokr_w1"} <= suffixes and suffixes & {"lokr_w2", "lokr_w2_a"}, suffixes
    else:
        assert suffixes == KEYS[kind]
    conv_modules = set(lora.weights) & KOHYA_LOCON
    assert bool(conv_modules) == (kind in ("locon", "dora", "loha", "lokr")), sorted(conv_modules)[:3]

    parts = _fresh_parts()
    base = _parts_outputs(parts)
    load_loras_into(parts.lora_targets(), [(lora, 1.0, str(path))])
    reloaded = _parts_outputs(parts)
    trained = _outputs(models["unet"], models["text_encoder_1"], models["text_encoder_2"], _probe_inputs())
    for name in trained:
        assert (trained[name] - base[name]).abs().max() > 1e-4, f"{kind}: training did not move {name}"
        torch.testing.assert_close(reloaded[name], trained[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["locon"])  # plain LoRA: tests/test_lora_interop.py
def test_diffusers_consumes_lora_and_locon_files_whole(trained_types, tiny_model_path, kind):
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    path, models = trained_types[kind]
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_path)
    messages = _load_capturing_warnings(pipeline, path)
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages
    modules = read_lora_file(path).weights
    layers = sum(isinstance(module, BaseTunerLayer) for module in pipeline.unet.modules())
    assert layers == sum(name.startswith("lora_unet_") for name in modules)
    if kind == "locon":
        convs = [m for m in pipeline.unet.modules() if isinstance(m, BaseTunerLayer) and isinstance(m.get_base_layer(), torch.nn.Conv2d)]
        assert convs, "diffusers attached no conv adapter"
    ours = _outputs(pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2, _probe_inputs())
    trained = _outputs(models["unet"], models["text_encoder_1"], models["text_encoder_2"], _probe_inputs())
    torch.testing.assert_close(ours["unet"], trained["unet"], rtol=1e-4, atol=1e-5)


def test_files_of_different_types_stack_as_their_updates_add(trained_types):
    """LoRA at 1, LoHa at 0.5, LoKr at 1 and DoRA at 0.7 at once equal the base whose weights get
    W + sum of strength * update, each update computed here from the file's tensors and the type's formula."""
    picks = [("lora", 1.0), ("loha", 0.5), ("lokr", 1.0), ("dora", 0.7)]
    files = [(read_lora_file(trained_types[kind][0]), strength, kind) for kind, strength in picks]

    stacked = _fresh_parts()
    load_loras_into(stacked.lora_targets(), files)

    merged = _fresh_parts()
    from lora_trainer.export.kohya_names import kohya_names

    for part, model in merged.lora_targets().items():
        by_name = kohya_names(part, model)
        originals = {path: model.get_submodule(path).weight.detach().clone() for path in by_name.values()}
        with torch.no_grad():
            for lora, strength, _ in files:
                for name, weights in lora.weights.items():
                    if name in by_name:
                        path = by_name[name]
                        update = _update(weights.tensors, weights.alpha, originals[path])
                        model.get_submodule(path).weight.add_(strength * update)
    expected = _parts_outputs(merged)
    got = _parts_outputs(stacked)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=2e-5)


def _update(tensors: dict[str, torch.Tensor], alpha: float, weight: torch.Tensor) -> torch.Tensor:
    """The weight change a module's file tensors make, from each type's published formula (LyCORIS' layouts)."""
    shape = weight.shape
    if "hada_w1_a" in tensors:  # LoHa: (w1a w1b) * (w2a w2b) * alpha / r
        rank = tensors["hada_w1_b"].shape[0]
        product = (tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (tensors["hada_w2_a"] @ tensors["hada_w2_b"])
        return (product * alpha / rank).reshape(shape)
    if "lokr_w1" in tensors or "lokr_w1_a" in tensors:  # LoKr: kron(w1, w2), scaled by alpha / r unless both are full
        w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
        w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
        rank = next((tensors[k].shape[1] for k in ("lokr_w1_a", "lokr_w2_a") if k in tensors), None)
        scale = 1.0 if rank is None else alpha / rank
        w2 = w2.reshape(w2.shape[0], -1)
        return (torch.kron(w1, w2) * scale).reshape(shape)
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    lora = (up.flatten(1) @ down.flatten(1) * alpha / down.shape[0]).reshape(shape)
    if "dora_scale" not in tensors:
        return lora
    # DoRA (Liu et al. 2024), per output row: m * (W + dW) / ||W + dW||
    merged = weight + lora
    norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return tensors["dora_scale"].reshape(norm.shape) * merged / norm - weight


def test_convolution_types_add_exactly_kohyas_locon_modules(trained_types):
    """LoCon, DoRA (with conv_rank), LoHa and LoKr adapt LoRA's modules plus convolutions named in kohya's LoCon list."""
    lora = set(read_lora_file(trained_types["lora"][0]).weights)
    for kind in ("locon", "dora", "loha", "lokr"):
        names = set(read_lora_file(trained_types[kind][0]).weights)
        assert lora < names, kind
        assert names - lora <= KOHYA_LOCON, sorted(names - lora - KOHYA_LOCON)[:3]
