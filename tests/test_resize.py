"""`lora-train resize`: an SVD cut is the closest rank-N update (Eckart-Young), a DyLoRA cut loads in diffusers
as the DyLoRA computed at rank N, and what cannot be cut is refused in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli
from test_lora_interop import _outputs, _probe_inputs

from lora_trainer.adapters.dylora import dylora_rank
from lora_trainer.adapters.lora import lora_parameters
from lora_trainer.adapters.model_weights import read_lora_weights
from lora_trainer.adapters.wiring import attach_adapters
from lora_trainer.config.model import ModelConfig
from lora_trainer.config.network import NetworkConfig
from lora_trainer.export.lora_file import read_lora_file, save_lora_file, to_kohya_tensors
from lora_trainer.model.parts import load_sdxl


def _perturbed_adapters(network: NetworkConfig, seed: int) -> dict[str, torch.nn.Module]:
    """The tiny SDXL's parts with `network` attached and every adapter parameter moved by seeded noise (a fresh
    adapter's up is zero, which would make every cut trivially exact)."""
    parts = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl"))
    trained = attach_adapters(parts.lora_targets(), network)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in trained.values():
            for parameter in lora_parameters(model):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return trained


def _save(trained: dict[str, torch.nn.Module], path, metadata: dict[str, str]):
    tensors = to_kohya_tensors({part: (model, read_lora_weights(model)) for part, model in trained.items()}, torch.float32)
    save_lora_file(path, tensors, metadata)
    return path


def _update(weights) -> torch.Tensor:
    """What the module adds to its layer's weight, flattened to [out, in * k * k], in float64."""
    up, down = weights.up.double(), weights.down.double()
    return weights.alpha / down.shape[0] * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))


# A LoCon's module shapes (down, up): linear layers and a 1x1 shortcut at rank 4, 3x3 convolutions at rank 2,
# so a cut to 3 cuts the first and copies the second.
LOCON_SHAPES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ((4, 64), (64, 4)),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2": ((4, 256), (64, 4)),
    "lora_unet_input_blocks_4_0_emb_layers_1": ((4, 128), (64, 4)),
    "lora_unet_input_blocks_4_0_skip_connection": ((4, 32, 1, 1), (64, 4, 1, 1)),
    "lora_unet_input_blocks_4_0_in_layers_2": ((2, 32, 3, 3), (64, 2, 1, 1)),
    "lora_unet_input_blocks_3_0_op": ((2, 32, 3, 3), (32, 2, 1, 1)),
}


@pytest.fixture(scope="module")
def locon_file(tmp_path_factory):
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (down, up) in LOCON_SHAPES.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(down, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(up, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(3.0 if down[0] == 4 else 1.5)
    args = {"conv_dim": "2", "conv_alpha": "1.5"}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "3.0", "ss_network_args": json.dumps(args)}
    path = tmp_path_factory.mktemp("locon") / "style.safetensors"
    save_lora_file(path, tensors, metadata)
    return path


def test_svd_cut_drops_exactly_the_smallest_singular_values(locon_file, capsys):
    code, out, err = run_cli(["resize", locon_file, "--rank", "3"], capsys)
    assert code == 0, err
    resized_path = locon_file.with_name("style-rank3.safetensors")
    assert out.strip().startswith(f"wrote {resized_path}") and len(out.strip().splitlines()) == 1
    source, resized = read_lora_file(locon_file), read_lora_file(resized_path)
    assert source.weights.keys() == resized.weights.keys()
    kinds = set()
    for name, old in source.weights.items():
        new = resized.weights[name]
        kinds.add((old.down.dim(), old.rank))
        if old.rank <= 3:
            assert new.alpha == old.alpha and torch.equal(new.down, old.down) and torch.equal(new.up, old.up), name
            continue
        assert new.down.shape == (3, *old.down.shape[1:]) and new.up.shape == (old.up.shape[0], 3, *old.up.shape[2:]), name
        singular = torch.linalg.svdvals(_update(old))
        dropped = math.sqrt(float(singular[3:].square().sum()))
        change = float(torch.linalg.matrix_norm(_update(old) - _update(new)))
        assert dropped > 1e-3, name  # random factors make every update full rank, so there is something to drop
        assert change == pytest.approx(dropped, rel=1e-4, abs=1e-6 * float(singular[0])), name
    assert kinds == {(2, 4), (4, 4), (4, 2)}


def test_svd_cut_metadata_says_the_new_dim_and_alpha(locon_file, capsys):
    output = locon_file.with_name("small.safetensors")
    assert run_cli(["resize", locon_file, "--rank", "2", "--output", output], capsys)[0] == 0
    metadata = read_lora_file(output).metadata
    # alpha / dim is kept, as kohya's resize_lora.py keeps it: 3 / 4 * 2
    assert (metadata["ss_network_dim"], float(metadata["ss_network_alpha"])) == ("2", 1.5)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.5"}
    assert json.loads(metadata["lora_train_resized_from"]) == {"file": "style.safetensors", "rank": 4}
    assert all(weights.alpha == pytest.approx(0.75 * weights.rank) for weights in read_lora_file(output).weights.values())


def test_per_block_dims_above_the_rank_come_down_to_it():
    from lora_trainer.export.resize import cut_network_args

    args = {"conv_dim": "8", "conv_alpha": "2.0", "block_dims": "2,8,0", "block_alphas": "1,4,1", "conv_block_dims": "8,2", "unit": "1"}
    cut = cut_network_args(args, "16.0", rank=4, dylora=False)
    # each alpha times 4 / dim where the dim was above 4; the conv blocks' alphas default to conv_alpha (2.0)
    assert cut == {"conv_dim": "4", "conv_alpha": "1.0", "block_dims": "2,4,0", "block_alphas": "1,2.0,1",
                   "conv_block_dims": "4,2", "conv_block_alphas": "1.0,2.0", "unit": "1"}


def test_an_existing_output_is_kept_unless_overwrite(locon_file, capsys):
    output = locon_file.with_name("taken.safetensors")
    output.write_bytes(b"mine")
    code, _, err = run_cli(["resize", locon_file, "--rank", "2", "--output", output], capsys)
    assert code != 0 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert output.read_bytes() == b"mine"
    assert run_cli(["resize", locon_file, "--rank", "2", "--output", output, "--overwrite"], capsys)[0] == 0
    assert read_lora_file(output).metadata["ss_network_dim"] == "2"


@pytest.mark.parametrize("rank", ["4", "9", "0"])
def test_a_rank_that_cuts_nothing_is_refused(locon_file, rank, capsys):
    code, _, err = run_cli(["resize", locon_file, "--rank", rank], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert ("already rank 4" in err) if rank != "0" else ("1 or more" in err)
    assert not locon_file.with_name(f"style-rank{rank}.safetensors").exists()


@pytest.fixture(scope="module")
def dylora(tmp_path_factory):
    network = NetworkConfig(type="dylora", rank=4, alpha=3, dylora_unit=2, conv_rank=4)  # convolutions too, as LoCon
    trained = _perturbed_adapters(network, seed=2)
    args = {"unit": "2", "conv_dim": "4", "conv_alpha": "3.0"}
    metadata = {"ss_network_module": "networks.dylora", "ss_network_dim": "4", "ss_network_alpha": "3.0", "ss_network_args": json.dumps(args),
                "lora_train_network_type": "dylora"}
    path = _save(trained, tmp_path_factory.mktemp("dylora") / "dy.safetensors", metadata)
    return path, {part: model.eval() for part, model in trained.items()}


def test_a_cut_dylora_loads_in_diffusers_as_the_dylora_at_that_rank(dylora, tiny_model_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    path, models = dylora
    assert run_cli(["resize", path, "--rank", "2"], capsys)[0] == 0
    resized = path.with_name("dy-rank2.safetensors")
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_path)
    pipeline.load_lora_weights(str(resized))
    inputs = _probe_inputs()
    loaded = _outputs(pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2, inputs)
    with dylora_rank(models.values(), 2):
        at_rank_2 = _outputs(models["unet"], models["text_encoder_1"], models["text_encoder_2"], inputs)
    at_full_rank = _outputs(models["unet"], models["text_encoder_1"], models["text_encoder_2"], inputs)
    for name in at_rank_2:
        torch.testing.assert_close(loaded[name], at_rank_2[name], rtol=1e-4, atol=1e-5)
    assert (at_full_rank["unet"] - at_rank_2["unet"]).abs().max() > 1e-3  # the cut matters, so the match says something
    metadata = read_lora_file(resized).metadata
    assert (metadata["ss_network_module"], metadata["lora_train_network_type"]) == ("networks.lora", "locon")
    # alpha * sqrt(N / r): the DyLoRA's scale at rank N, alpha / r * sqrt(r / N), written as alpha' / N
    assert (metadata["ss_network_dim"], float(metadata["ss_network_alpha"])) == ("2", pytest.approx(3 * math.sqrt(2 / 4)))
    args = json.loads(metadata["ss_network_args"])
    assert (args.keys(), args["conv_dim"], float(args["conv_alpha"])) == ({"conv_dim", "conv_alpha"}, "2", pytest.approx(3 * math.sqrt(2 / 4)))


def test_a_dylora_rank_off_its_unit_is_refused(dylora, capsys):
    path, _ = dylora
    code, _, err = run_cli(["resize", path, "--rank", "3"], capsys)
    assert code != 0 and "multiple of 2" in err and len(err.strip().splitlines()) == 1


def _module_file(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    name = "lora_unet_input_blocks_4_1_proj_in"
    save_lora_file(path, {**{f"{name}.{key}": tensor for key, tensor in tensors.items()}, f"{name}.alpha": torch.tensor(2.0)}, metadata)
    return path


@pytest.mark.parametrize(
    ("kind", "tensors", "metadata"),
    [
        ("LoHa", {"hada_w1_a": torch.ones(8, 4), "hada_w1_b": torch.ones(4, 8), "hada_w2_a": torch.ones(8, 4), "hada_w2_b": torch.ones(4, 8)},
         {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"})}),
        ("LoKr", {"lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.ones(4, 4), "lokr_w2_b": torch.ones(4, 4)},
         {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr"})}),
        ("DoRA", {"lora_down.weight": torch.ones(4, 8), "lora_up.weight": torch.ones(8, 4), "dora_scale": torch.ones(8, 1)}, {}),
        ("DoRA", {"lora_down.weight": torch.ones(4, 8), "lora_up.weight": torch.ones(8, 4)},
         {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lora", "dora_wd": "True"})}),
    ],
)
def test_types_without_a_rank_cut_are_refused(kind, tensors, metadata, tmp_path, capsys):
    path = _module_file(tmp_path / "other.safetensors", tensors, metadata)
    code, out, err = run_cli(["resize", path, "--rank", "2"], capsys)
    assert code != 0 and out == ""
    assert err.strip().splitlines() == [f"error: resize cuts LoRA, LoCon and DyLoRA files; {path} is a {kind}"]
    assert list(tmp_path.iterdir()) == [path]
