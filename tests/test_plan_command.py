"""`lora-train plan`: every image's bucket, the steps, the files and the GPU memory, before any weight loads; and
the memory estimate against the measured runs it was calibrated on."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_cli, small_raw_config, write_yaml
from PIL import Image

from lora_trainer.fit.memory_advice import memory_warning
from lora_trainer.fit.memory_estimate import (
    GIB,
    MEASURED_PEAKS,
    SDXL_RANK32_UNET,
    SDXL_UNET_ACTIVATION_ELEMENTS,
    MemorySettings,
    estimate_peak_memory,
)

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"  # never looked up: SDXL's shipped configs stand for it


@pytest.fixture
def no_weights_load(monkeypatch):
    """Every way a model's weights could be read raises, so a plan that reads any fails."""
    import diffusers
    import safetensors
    import safetensors.torch
    import torch
    import transformers

    from lora_trainer.model import parts

    def refuse(*_args, **_kwargs):
        raise AssertionError("a plan read model weights")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(parts.SDXLParts, "__init__", refuse)
    monkeypatch.setattr(parts, "load_sdxl", refuse)
    for module, name in ((safetensors.torch, "load_file"), (safetensors.torch, "safe_open"), (safetensors, "safe_open"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def planned_folder(tmp_path: Path) -> Path:
    """Images at 128 px: kept (downscaled), upscaled, another bucket, too small, unreadable."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, size in {"big": (256, 256), "small_up": (80, 80), "wide": (256, 128), "tiny": (40, 40)}.items():
        Image.new("RGB", size, (200, 30, 30)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a red box, {name}", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def plan_config(tmp_path: Path, folder: Path, **sections) -> Path:
    raw = small_raw_config(tmp_path)
    raw["datasets"] = [{"path": str(folder), "repeats": 2}]
    raw["data"]["resolution"] = 128
    raw["training"] = {"epochs": 3, "batch_size": 2, "learning_rate": 1e-3, "mixed_precision": "no", "seed": 0}
    raw["output"].update(save_every_n_epochs=1, save_every_n_steps=2)
    raw["sample"] = {"prompts": ["a red circle"], "every_n_epochs": 1}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return write_yaml(tmp_path / "plan.yaml", raw)


def table_row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(name + " "))


def test_plan_shows_every_image_the_steps_the_files_and_the_memory_without_loading_weights(
    tmp_path, planned_folder, no_weights_load, monkeypatch, capsys
):
    home = tmp_path / "home"  # its own: other tests of the session may have built the tiny model in theirs
    monkeypatch.setenv("LORA_TRAIN_HOME", str(home))
    code, out, err = run_cli(["plan", plan_config(tmp_path, planned_folder), "--gpu-memory", "80"], capsys)
    assert code == 0, err
    assert "Traceback" not in err

    rows = {name: table_row(out, name) for name in ("big.png", "small_up.png", "wide.png", "tiny.png", "broken.png")}
    assert re.search(r"256 x 256\s+128 x 128\s+kept$", rows["big.png"])
    assert re.search(r"80 x 80\s+128 x 128\s+upscaled 1\.60x$", rows["small_up.png"])
    assert re.search(r"256 x 128\s+192 x 64\s+kept$", rows["wide.png"])
    assert "40 x 40" in rows["tiny.png"] and "dropped: 40x40 is smaller than the smallest bucket side 64" in rows["tiny.png"]
    assert "dropped: cannot read this image" in rows["broken.png"]
    fate_columns = {line.index(word) for line, word in (
        (rows["big.png"], "kept"), (rows["small_up.png"], "upscaled"), (rows["tiny.png"], "dropped"), (rows["broken.png"], "dropped"),
    )}
    assert len(fate_columns) == 1, "the fate column lines up"
    assert "images: 5 found, 3 train (1 of them upscaled), 0 held out for validation, 2 dropped" in out

    # 3 images x 2 repeats: 128x128 has 4 items (2 batches of 2), 192x64 has 2 (1 batch).
    assert re.search(r"128 x 128\s+1\.00\s+2\s+4\s+2$", out, re.MULTILINE)
    assert re.search(r"192 x 64\s+3\.00\s+1\s+2\s+1$", out, re.MULTILINE)
    assert "steps per epoch    3 = 3 batches / 1 accumulated" in out
    assert "total steps        9 = 3 epochs x 3 steps" in out

    assert "final LoRA            test_lora.safetensors: fp32, after step 9" in out
    assert "test_lora-000001.safetensors, test_lora-000002.safetensors: 2 files, every 1 epochs" in out
    assert "test_lora-step000002.safetensors ... test_lora-step000008.safetensors: 4 files, every 2 steps" in out
    assert "samples/e000000-00-a-red-circle.png ... samples/e000003-00-a-red-circle.png: 4 images, 1 prompt after epochs 0, 1, 2, 3" in out
    assert "test_lora-history.json" in out and "test_lora-report.html" in out and "logs/test_lora/" in out

    total = re.search(r"^  total +([\d.]+ MiB)  torch's allocated peak", out, re.MULTILINE)
    assert total, out
    assert "builtin:tiny-sdxl's recipe" in out
    assert "warning" not in out  # tens of MiB fit in 80 GiB
    # Nothing was built or written: not the tiny model, not the output folder, not the cache.
    assert not (home / "builtin").exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_an_sdxl_plan_over_the_gpu_memory_warns_with_the_changes_that_apply(tmp_path, planned_folder, no_weights_load, capsys):
    config = plan_config(
        tmp_path, planned_folder, model={"pretrained": SDXL_HUB_ID},
        network={"rank": 32, "alpha": 16, "train_text_encoder_1": False, "train_text_encoder_2": False},
        training={"mixed_precision": "bf16", "optimizer": "adamw8bit", "batch_size": 2}, data={"resolution": 1024, "min_bucket_side": 64},
    )
    code, out, err = run_cli(["plan", config, "--gpu-memory", "12", "--processes", "2"], capsys)
    assert code == 0, err  # a plan, whatever the estimate
    assert "global batch       4 = 2 per device x 2 processes" in out
    assert "85.1M trained parameters x 14 bytes (fp32 weight 4, gradient 4, adamw8bit state 2, DDP bucket 4)" in out
    warning = next(line for line in out.splitlines() if line.startswith("warning:"))
    assert "is over --gpu-memory 12 GiB" in warning
    assert "training.gradient_checkpointing: true -> " in warning and "(fits)" in warning
    assert "training.batch_size: 1 with training.gradient_accumulation_steps: 2" in warning
    assert "training.optimizer" not in warning  # already 8-bit
    assert "network.train_text_encoder" not in warning  # already frozen

    # Only what this config can change: it checkpoints already and trains at batch 1.
    checkpointed = MemorySettings(batch_size=1, resolution=1024, mixed_precision="bf16", gradient_checkpointing=True, optimizer="adamw")
    warning = memory_warning(SDXL_RANK32_UNET, checkpointed, 6)
    assert warning.startswith("warning: the estimated peak of 6.77 GiB is over --gpu-memory 6 GiB")
    assert "training.optimizer: adamw8bit -> 6.29 GiB" in warning
    assert "gradient_checkpointing" not in warning and "batch_size" not in warning
    assert memory_warning(SDXL_RANK32_UNET, checkpointed, 7).startswith("note: the estimated peak of 6.77 GiB is within 10%")
    assert memory_warning(SDXL_RANK32_UNET, checkpointed, 24) is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("datasets.0.path=/nowhere/at/all", "datasets.0.path: folder not found: /nowhere/at/all"),
        ("training.batch_size=0", "training.batch_size"),
    ],
)
def test_a_bad_config_is_one_line_naming_the_field(tmp_path, planned_folder, override, expected, capsys):
    code, out, err = run_cli(["plan", plan_config(tmp_path, planned_folder), "--set", override], capsys)
    assert code == 2
    assert expected in err and err.startswith("error: ")
    assert "Traceback" not in err and not out


def test_a_folder_of_only_unusable_images_lists_them_then_fails(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "small.png")
    code, out, err = run_cli(["plan", plan_config(tmp_path, folder)], capsys)
    assert code == 1
    assert "small.png" in out and "dropped: 20x20 is smaller" in out
    assert err.strip().splitlines()[-1].startswith("error: no usable training images are left")


def test_the_estimate_reproduces_every_measured_run():
    for peak in MEASURED_PEAKS:
        estimate = estimate_peak_memory(SDXL_RANK32_UNET, peak.settings).total_gib
        assert estimate == pytest.approx(peak.gib, rel=0.05), peak
        assert peak.source == "benchmarks/results.md, 2026-11-26, H200"


def test_the_estimate_moves_the_way_each_setting_moves_memory():
    base = MemorySettings(batch_size=2, resolution=1024, mixed_precision="bf16", gradient_checkpointing=False, optimizer="adamw")

    def gib(settings: MemorySettings, counts=SDXL_RANK32_UNET) -> float:
        return estimate_peak_memory(counts, settings).total_gib

    doubled_rank = replace(SDXL_RANK32_UNET, unet=replace(SDXL_RANK32_UNET.unet, adapter_parameters=2 * 85_114_880))
    assert gib(replace(base, batch_size=4)) > gib(base)
    assert gib(replace(base, resolution=1280)) > gib(base) > gib(replace(base, resolution=768))
    assert gib(base, doubled_rank) > gib(base)
    assert gib(replace(base, gradient_checkpointing=True)) < gib(base)
    assert gib(replace(base, optimizer="adamw8bit")) < gib(base)
    assert gib(replace(base, optimizer="lion8bit")) < gib(replace(base, optimizer="lion")) < gib(base)
    assert gib(replace(base, base_precision="nf4")) < gib(replace(base, base_precision="fp8")) < gib(base)
    assert gib(replace(base, mixed_precision="no")) > gib(base)
    trained_text = replace(base, trained_parts=("unet", "text_encoder_1", "text_encoder_2"), text_encoders_on_gpu=True)
    assert gib(trained_text) > gib(base) + 1.5  # their bf16 weights alone are 1.5 GiB


def test_the_sdxl_counts_are_what_the_meta_device_counts(monkeypatch):
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.config.network import NetworkConfig
    from lora_trainer.fit import model_counts

    network = NetworkConfig(rank=32, alpha=16, train_text_encoder_1=False, train_text_encoder_2=False)
    counts = model_counts.count_model(ModelConfig(pretrained=SDXL_HUB_ID), network)
    assert counts.unet == SDXL_RANK32_UNET.unet
    for part in ("text_encoder_1", "text_encoder_2"):
        expected = replace(SDXL_RANK32_UNET.part(part), activation_elements=0)  # frozen: none kept for a backward pass
        assert counts.part(part) == expected
    assert counts.vae_parameters == SDXL_RANK32_UNET.vae_parameters
    assert SDXL_RANK32_UNET.unet.parameters * 2 / GIB == pytest.approx(4.78, abs=0.01)
    # The UNet's activation width, counted again rather than taken for SDXL's layout.
    unet = model_counts._meta_model(ModelConfig(pretrained=SDXL_HUB_ID)).unet
    monkeypatch.setattr(model_counts, "has_sdxl_layout", lambda _config: False)
    assert model_counts.activation_elements("unet", unet) == SDXL_UNET_ACTIVATION_ELEMENTS
