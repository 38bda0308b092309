"""Images are read upright and flattened, cut as planned, and the latent cache is content-addressed and self-checking."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MIXED_SHAPES, train_in_process
from PIL import Image

from lora_trainer.cache.latents import open_latent_cache
from lora_trainer.cache.training_data import prepare_training_data
from lora_trainer.config.load import parse_config
from lora_trainer.data.buckets import CropPlan
from lora_trainer.data.images import UnreadableImage, apply_plan, load_rgb
from lora_trainer.model.parts import load_sdxl

CPU = torch.device("cpu")


def test_exif_orientation_is_honoured(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the picture is upright when turned to 20x40
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_transparency_is_flattened_onto_the_stated_background(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((3, 3)) == (255, 255, 255)
    assert load_rgb(tmp_path / "clear.png", (0, 128, 0)).getpixel((3, 3)) == (0, 128, 0)


def test_unreadable_image_says_why(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(UnreadableImage, match="cannot read this image"):
        load_rgb(tmp_path / "bad.jpg")


def test_a_plan_resizes_crops_and_mirrors():
    image = Image.new("RGB", (160, 128), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 16, 128))  # a white band on the left, mostly cut away by the crop
    plan = CropPlan((128, 160), (64, 80), (64, 64), (0, 8))
    cropped = apply_plan(image, plan)
    assert cropped.size == (64, 64)
    assert max(cropped.getpixel((0, 32))) < 50 and max(apply_plan(image, plan, flip=True).getpixel((63, 32))) < 50


@pytest.fixture
def dataset_copy(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(MIXED_SHAPES, folder)
    return folder


@pytest.fixture
def config_on(raw_config, tmp_path):
    def make(folder, **data):
        raw = {**raw_config, "datasets": [{"path": str(folder)}], "data": {**raw_config["data"], **data}}
        return parse_config(raw)

    return make


def load_vae(model):
    return load_sdxl(model).vae


def prepare(config, vae=None):
    vae = vae if vae is not None else load_vae(config.model)
    return prepare_training_data(config, open_latent_cache(config, vae), CPU, show_progress=False)


def paths_by_image(data) -> dict[str, str]:
    return {item.record.image_path.name: item.latent.path for item in data.items}


def test_a_second_run_encodes_nothing_and_a_touch_is_not_an_edit(dataset_copy, config_on):
    config = config_on(dataset_copy)
    first = prepare(config)
    assert (first.latents.reused, first.latents.encoded) == (0, 12)
    again = prepare(config)
    assert (again.latents.reused, again.latents.encoded) == (12, 0)
    image = dataset_copy / "03_yellow_circle.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # same bytes, newer time
    assert prepare(config).latents.encoded == 0


def test_editing_one_image_re_encodes_exactly_that_image(dataset_copy, config_on):
    config = config_on(dataset_copy)
    before = paths_by_image(prepare(config))
    image = dataset_copy / "03_yellow_circle.png"
    Image.open(image).convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(image)
    data = prepare(config)
    after = paths_by_image(data)
    assert data.latents.encoded == 1
    assert [name for name in before if before[name] != after[name]] == ["03_yellow_circle.png"]


def test_resolution_or_vae_changes_re_encode_everything(dataset_copy, config_on, tmp_path):
    config = config_on(dataset_copy)
    prepare(config)
    assert prepare(config_on(dataset_copy, resolution=128)).latents.encoded == 12

    other_vae = load_vae(config.model)
    with torch.no_grad():
        other_vae.encoder.conv_in.weight.mul_(1.01)
    other_vae.save_pretrained(tmp_path / "other-vae")
    raw = config.model_dump(mode="json")
    raw["model"]["vae"] = str(tmp_path / "other-vae")
    assert prepare(parse_config(raw)).latents.encoded == 12


def test_the_same_images_elsewhere_reuse_the_cache(dataset_copy, config_on, tmp_path):
    prepare(config_on(dataset_copy))
    elsewhere = tmp_path / "10_renamed"
    shutil.copytree(dataset_copy, elsewhere)
    assert prepare(config_on(elsewhere)).latents.reused == 12  # keyed by content, not by path


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_a_damaged_cache_file_is_reported_and_encoded_again(dataset_copy, config_on, damage, caplog):
    config = config_on(dataset_copy)
    path = prepare(config).items[0].latent.path
    # A copy: safetensors maps the file, and the damage below rewrites it in place.
    content, latents = path.read_bytes(), prepare(config).items[0].latent.load().clone()
    if damage == "truncate":
        path.write_bytes(content[: len(content) // 2])
    else:
        path.write_bytes(content[:-5] + bytes([content[-5] ^ 0xFF]) + content[-4:])
    data = prepare(config)
    assert data.latents.repaired == [path] and data.latents.encoded == 1
    assert f"damaged latent cache file {path}" in caplog.text
    # Encoded again it is the same sample (seeded by its key), up to batch-size rounding in the VAE's kernels.
    torch.testing.assert_close(data.items[0].latent.load(), latents, rtol=1e-4, atol=1e-5)


def test_cached_latents_equal_a_fresh_vae_encode(dataset_copy, config_on):
    config = config_on(dataset_copy, resolution=64)
    data = prepare(config)
    vae = load_vae(config.model)
    for item in data.items[:4]:
        # The expected pixels, built here with PIL directly: resize to the plan's size, cut its window.
        height, width = item.plan.resized
        top, left = item.plan.crop_top_left
        picture = Image.open(item.record.image_path).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        picture = picture.crop((left, top, left + item.plan.bucket[1], top + item.plan.bucket[0]))
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            distribution = vae.encode(pixels).latent_dist
        latents = item.latent.load()
        assert latents.shape == distribution.mean[0].shape and latents.dtype == torch.float32
        # A posterior sample whose noise is seeded by the entry's key (its file name), so it can be redrawn here.
        key = item.latent.path.stem
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(int(key[:15], 16)))
        expected = (distribution.mean[0] + distribution.std[0] * noise) * vae.config.scaling_factor
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)


def test_flip_aug_caches_both_orientations(dataset_copy, config_on, raw_config):
    raw = {**raw_config, "datasets": [{"path": str(dataset_copy), "flip_aug": True}]}
    data = prepare(parse_config(raw))
    assert data.latents.encoded == 24
    vae = load_vae(parse_config(raw).model)
    item = data.items[1]
    mirrored_pixels = apply_plan(load_rgb(item.record.image_path), item.plan, flip=True)
    pixels = torch.from_numpy(np.asarray(mirrored_pixels, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        distribution = vae.encode(pixels).latent_dist
    z = (item.flipped_latent.load() / vae.config.scaling_factor - distribution.mean[0]) / distribution.std[0]
    assert z.abs().max() < 6 and 0.6 < z.std() < 1.4
    assert item.flipped_latent.path != item.latent.path


def test_nan_latents_are_refused_naming_the_image(dataset_copy, config_on, monkeypatch):
    from lora_trainer.errors import UserError

    config = config_on(dataset_copy)
    vae = load_vae(config.model)
    with torch.no_grad():
        vae.quant_conv.bias.fill_(float("nan"))
    with pytest.raises(UserError, match=r"00_red_circle\.png: the VAE produced NaN"):
        prepare(config, vae)
    assert not list((config.cache_dir / "latents").glob("*/*.safetensors"))


def test_nan_latents_without_the_cache_name_the_image_of_the_batch(dataset_copy, raw_config, monkeypatch):
    """With `data.cache_latents: false` the VAE encodes every step; a NaN latent names its image there too."""
    from diffusers import AutoencoderKL

    from lora_trainer.errors import UserError
    from lora_trainer.fit import loop

    real_encode = AutoencoderKL.encode

    def encode_second_image_to_nan(self, pixels, *args, **kwargs):
        output = real_encode(self, pixels, *args, **kwargs)
        if len(pixels) > 1:
            output.latent_dist.mean[1] = float("nan")
        return output

    monkeypatch.setattr(AutoencoderKL, "encode", encode_second_image_to_nan)
    vae = load_vae(parse_config(raw_config).model)
    batch = {"pixels": torch.zeros(2, 3, 64, 64), "image_paths": ["first.png", "second.png"]}
    batch["latents"] = loop._latents_of(batch, vae)
    with pytest.raises(UserError, match=r"^second\.png: the VAE produced NaN/inf latents"):
        loop._check_latents([(batch["image_paths"], torch.isfinite(batch["latents"]).flatten(1).all(dim=1))])

    raw = {**raw_config, "datasets": [{"path": str(dataset_copy)}], "data": {**raw_config["data"], "cache_latents": False}}
    with pytest.raises(UserError, match="the VAE produced NaN/inf latents") as error:
        train_in_process(raw)
    named = Path(str(error.value).split(": the VAE")[0])
    assert named.parent == dataset_copy and named.is_file()


def test_cache_files_are_written_under_a_temporary_name(dataset_copy, config_on, monkeypatch):
    import lora_trainer.cache.latents as cache_module

    written = []
    real = cache_module.write_bytes_atomic
    monkeypatch.setattr(cache_module, "write_bytes_atomic", lambda path, data: written.append(path) or real(path, data))
    data = prepare(config_on(dataset_copy))
    assert sorted(written) == sorted(item.latent.path for item in data.items)
    assert not list(data.items[0].latent.path.parent.parent.glob("*/*.tmp"))
