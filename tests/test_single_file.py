"""Single-file SDXL checkpoints, as model sites ship them: the same training and images as the diffusers folder,
refusals that say what a wrong file is, pickles only with consent, and a LoRA that records its base.

The checkpoint is the tiny test model converted to Stability's original layout by `ldm_checkpoint.py`
(where that mapping comes from is written there); `model.config` gives the tiny folder's configs,
since the tiny model is not shaped like SDXL base.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import run_cli, small_raw_config, train_in_process, write_yaml
from ldm_checkpoint import write_ldm_checkpoint
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from lora_trainer.config.load import parse_config
from lora_trainer.errors import ModelFileError
from lora_trainer.model.parts import load_sdxl


@pytest.fixture(scope="module")
def checkpoint(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ldm_checkpoint(tiny_model_path, tmp_path_factory.mktemp("checkpoint") / "tiny-sdxl.safetensors")


def _file_config(raw: dict, checkpoint: Path, tiny_model_path: Path, **model) -> dict:
    raw["model"] = {"pretrained": str(checkpoint), "config": str(tiny_model_path), **model}
    return raw


def test_a_single_file_trains_exactly_like_its_folder(checkpoint, tiny_model_path, tmp_path):
    folder_run, folder_lora = train_in_process(_one_step(small_raw_config(tmp_path / "folder")))
    file_raw = _file_config(_one_step(small_raw_config(tmp_path / "file")), checkpoint, tiny_model_path)
    file_run, file_lora = train_in_process(file_raw)

    assert file_run.history.train_losses[0] == pytest.approx(folder_run.history.train_losses[0], rel=1e-6, abs=1e-7)
    with safe_open(folder_lora, "pt") as expected, safe_open(file_lora, "pt") as got:
        assert set(expected.keys()) == set(got.keys())
        for key in expected.keys():
            torch.testing.assert_close(got.get_tensor(key), expected.get_tensor(key), rtol=1e-5, atol=1e-6)
        metadata = got.metadata()
    # kohya's two hashes of the base, computed here independently of lora_trainer.model.identity.
    data = checkpoint.read_bytes()
    assert metadata["ss_sd_model_name"] == "tiny-sdxl.safetensors"
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert metadata["ss_prediction_type"] == "epsilon"


def _one_step(raw: dict) -> dict:
    raw["training"].update(max_steps=1)
    return raw


def test_a_single_file_samples_the_same_image_as_its_folder(checkpoint, tiny_model_path, tmp_path, capsys):
    common = ["--prompt", "a red circle", "--steps", "3", "--width", "64", "--height", "64", "--seed", "7"]
    code, _, err = run_cli(["sample", "--model", tiny_model_path, *common, "--out", tmp_path / "folder"], capsys)
    assert code == 0, err
    code, _, err = run_cli(
        ["sample", "--model", checkpoint, "--model-config", tiny_model_path, *common, "--out", tmp_path / "file"], capsys
    )
    assert code == 0, err
    [from_folder], [from_file] = sorted((tmp_path / "folder").glob("*.png")), sorted((tmp_path / "file").glob("*.png"))
    assert list(Image.open(from_file).getdata()) == list(Image.open(from_folder).getdata())


def test_the_whole_file_hash_is_computed_once_per_file_version(checkpoint, monkeypatch):
    from lora_trainer.model import identity

    first = identity.file_sha256(checkpoint)
    monkeypatch.setattr(identity, "_hash_file", lambda *args: pytest.fail("hashed again although the file is unchanged"))
    assert identity.file_sha256(checkpoint) == first == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def _sd15_shaped(path: Path) -> Path:
    """Key names and the shapes that tell SD1.5 apart: CLIP-L under cond_stage_model, 768-wide cross-attention."""
    save_file(
        {
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 8),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(2, 2),
            "first_stage_model.encoder.conv_out.weight": torch.zeros(8, 2, 3, 3),
        },
        str(path),
    )
    return path


def _truncated(checkpoint: Path, path: Path) -> Path:
    data = checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_file(path: Path) -> Path:
    path.write_text("this is not a model, it is a download page saved by mistake\n" * 20)
    return path


def _pickle(checkpoint: Path, path: Path) -> Path:
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(str(checkpoint))}, path)
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda checkpoint, tmp: _sd15_shaped(tmp / "sd15.safetensors"), "Stable Diffusion 1.x"),
        (lambda checkpoint, tmp: _truncated(checkpoint, tmp / "cut.safetensors"), "truncated"),
        (lambda checkpoint, tmp: _text_file(tmp / "page.safetensors"), "not a safetensors file"),
        (lambda checkpoint, tmp: _pickle(checkpoint, tmp / "model.ckpt"), "is a pickle"),
    ],
    ids=["sd15", "truncated", "text-file", "pickle-without-flag"],
)
def test_a_wrong_model_file_is_refused_in_one_line_with_exit_2(make, expected, checkpoint, tmp_path, capsys):
    model_file = make(checkpoint, tmp_path)
    raw = small_raw_config(tmp_path)
    raw["model"] = {"pretrained": str(model_file)}
    code, out, err = run_cli(["train", write_yaml(tmp_path / "config.yaml", raw)], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(model_file.name) in lines[0], err
    assert "Traceback" not in err and "warn" not in err.lower()
    assert not (tmp_path / "out").exists()


def test_a_lora_given_as_the_base_is_refused(small_lora_file, tmp_path, capsys):
    raw = small_raw_config(tmp_path)
    raw["model"] = {"pretrained": str(small_lora_file)}
    code, _, err = run_cli(["train", write_yaml(tmp_path / "config.yaml", raw)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "LoRA" in err, err


class Payload:
    """An object that is not a tensor or a plain container: unpickling it means running code of its class."""


def test_a_pickle_loads_only_with_consent_and_then_without_running_code(checkpoint, tiny_model_path, tmp_path):
    pickled = _pickle(checkpoint, tmp_path / "tiny.ckpt")
    config = parse_config(_file_config(small_raw_config(tmp_path), pickled, tiny_model_path, allow_pickle=True))
    from_pickle = load_sdxl(config.model).unet.state_dict()
    from_folder = load_sdxl(parse_config(small_raw_config(tmp_path)).model).unet.state_dict()
    assert from_pickle.keys() == from_folder.keys()
    assert all(torch.equal(from_pickle[key], from_folder[key]) for key in from_folder)

    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.ckpt")
    evil = parse_config(_file_config(small_raw_config(tmp_path), tmp_path / "evil.ckpt", tiny_model_path, allow_pickle=True))
    with pytest.raises(ModelFileError, match="cannot read this pickle safely"):
        load_sdxl(evil.model)


def test_the_prediction_type_comes_from_the_file_and_a_conflict_is_refused(tiny_model_path, tmp_path):
    v_pred = write_ldm_checkpoint(tiny_model_path, tmp_path / "vpred.safetensors", extra_tensors={"v_pred": torch.tensor([])})
    config = parse_config(_file_config(small_raw_config(tmp_path), v_pred, tiny_model_path))
    parts = load_sdxl(config.model)
    assert parts.prediction_type == "v_prediction"
    assert parts.noise_scheduler.config.prediction_type == "v_prediction"

    conflicting = parse_config(_file_config(small_raw_config(tmp_path), v_pred, tiny_model_path, prediction_type="epsilon"))
    with pytest.raises(ModelFileError, match="model.prediction_type: epsilon, but vpred.safetensors says v_prediction") as error:
        load_sdxl(conflicting.model)
    assert error.value.exit_code == 2


def test_a_separate_vae_file_replaces_the_checkpoints_own(checkpoint, tiny_model_path, tmp_path):
    with safe_open(checkpoint, "pt") as handle:
        vae_only = {key.removeprefix("first_stage_model."): handle.get_tensor(key) for key in handle.keys() if key.startswith("first_stage_model.")}
    save_file(vae_only, str(tmp_path / "vae.safetensors"))
    no_vae = write_ldm_checkpoint(tiny_model_path, tmp_path / "no-vae.safetensors", include_vae=False)

    with pytest.raises(ModelFileError, match="holds no VAE; set model.vae"):
        load_sdxl(parse_config(_file_config(small_raw_config(tmp_path), no_vae, tiny_model_path)).model)
    config = parse_config(_file_config(small_raw_config(tmp_path), no_vae, tiny_model_path, vae=str(tmp_path / "vae.safetensors")))
    loaded = load_sdxl(config.model).vae.state_dict()
    from diffusers import AutoencoderKL

    expected = AutoencoderKL.from_pretrained(tiny_model_path, subfolder="vae").state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_a_path_that_does_not_exist_is_named_instead_of_sent_to_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    raw = small_raw_config(tmp_path)
    for missing in ("models/sdxl", "models/sdxl.safetensors", "../elsewhere/model"):
        raw["model"] = {"pretrained": missing}
        code, _, err = run_cli(["train", write_yaml(tmp_path / "config.yaml", raw)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "model.pretrained: no such file or folder" in err, err


def test_sample_warns_when_a_lora_is_drawn_on_another_base(small_lora_file, checkpoint, tiny_model_path, tmp_path, caplog):
    from lora_trainer.export.lora_file import read_lora_file
    from lora_trainer.sampling.base_check import warn_about_other_bases

    lora = read_lora_file(small_lora_file)
    on_its_base = parse_config(small_raw_config(tmp_path)).model
    assert warn_about_other_bases([(lora, 1.0, "a.safetensors")], on_its_base) == []
    elsewhere = parse_config(_file_config(small_raw_config(tmp_path), checkpoint, tiny_model_path)).model
    [warning] = warn_about_other_bases([(lora, 1.0, "a.safetensors")], elsewhere)
    assert "a.safetensors: trained on" in warning and "tiny-sdxl.safetensors" in warning


def test_the_shipped_sdxl_config_is_a_unet_only_preset_with_repeats_from_folders():
    import yaml
    from conftest import REPO

    raw = yaml.safe_load((REPO / "configs" / "sdxl_lora.yaml").read_text())
    assert all("repeats" not in dataset for dataset in raw["datasets"])
    assert raw["network"]["train_unet"] and not raw["network"]["train_text_encoder_1"] and not raw["network"]["train_text_encoder_2"]
    text = (REPO / "configs" / "sdxl_lora.yaml").read_text()
    assert "# text_encoder_learning_rate:" in text and "# train_text_encoder_1: true" in text


@pytest.mark.parametrize(
    "dropped, part",
    [
        ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "UNet"),
        ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "text_encoder"),
    ],
)
def test_a_checkpoint_missing_a_weight_is_refused_not_loaded_with_garbage(dropped, part, checkpoint, tiny_model_path, tmp_path):
    # diffusers' converters either fail naming no key or leave the weight uninitialised (tests/ldm_checkpoint.py).
    from safetensors.torch import load_file

    partial = tmp_path / "partial.safetensors"
    save_file({key: value for key, value in load_file(str(checkpoint)).items() if key != dropped}, str(partial))
    parts = load_sdxl(parse_config(_file_config(small_raw_config(tmp_path), partial, tiny_model_path)).model)
    with pytest.raises(ModelFileError, match=f"partial.safetensors: .*{part}") as error:
        parts.unet if part == "UNet" else parts.text
    assert error.value.exit_code == 2


def test_an_sdxl_base_shaped_file_is_described_by_the_configs_shipped_with_lora_train():
    """Offline with nothing but the file: SDXL base 1.0's configs and tokenizers ship in the package. Real SDXL
    weights cannot be had here, so the parts are built on the meta device (shapes, no memory) and their LDM
    key set is what the header classifier and diffusers' own converter see."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from ldm_checkpoint import CLIP_L_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, clip_l_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_trainer.model.checkpoint_file import TensorInfo, inspect_sdxl_checkpoint
    from lora_trainer.model.sources import SDXL_BASE_CONFIG

    unet_config = UNet2DConditionModel.load_config(SDXL_BASE_CONFIG, subfolder="unet")
    vae_config = AutoencoderKL.load_config(SDXL_BASE_CONFIG, subfolder="vae")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG, subfolder="text_encoder"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG, subfolder="text_encoder_2"))
    assert sum(parameter.numel() for parameter in unet.parameters()) == 2_567_463_684  # SDXL base 1.0's UNet
    ldm_unet = {UNET_PREFIX + key: value for key, value in unet_to_ldm(unet.state_dict(), unet_config).items()}
    header = {
        **ldm_unet,
        **{VAE_PREFIX + key: value for key, value in vae_to_ldm(vae.state_dict(), vae_config).items()},
        **{CLIP_L_PREFIX + key: value for key, value in clip_l_to_ldm(clip_l.state_dict()).items()},
        **{OPEN_CLIP_PREFIX + key: value for key, value in open_clip_to_ldm(clip_g.state_dict()).items()},
    }
    facts = inspect_sdxl_checkpoint("sd_xl_base_1.0.safetensors", {key: TensorInfo(tuple(value.shape), "F16") for key, value in header.items()}, {})
    assert facts.sdxl_base_shape and facts.has_vae and facts.has_text_encoders and facts.prediction_type is None
    assert set(convert_ldm_unet_checkpoint(ldm_unet, unet_config)) == set(unet.state_dict())

    tokenizer_1 = CLIPTokenizer.from_pretrained(SDXL_BASE_CONFIG, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(SDXL_BASE_CONFIG, subfolder="tokenizer_2")
    assert tokenizer_1("a photo of a cat").input_ids == tokenizer_2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
