"""Images are fitted by resize + center crop, the crop reaches time_ids, and latents are cached once."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import REPO
from PIL import Image

from lora_trainer.config import validate_config
from lora_trainer.data.cache import LatentCache, cache_latents, encode_into_cache, fill_latent_cache
from lora_trainer.data.dataset import LatentDataset
from lora_trainer.data.images import CropInfo, load_rgb, resize_and_center_crop
from lora_trainer.data.records import scan_datasets
from lora_trainer.errors import UserError


@pytest.mark.parametrize(
    "size, expected",
    [
        ((160, 128), CropInfo((128, 160), (0, 8), (64, 64))),  # landscape: 80x64, 8 px cut on each side
        ((128, 192), CropInfo((192, 128), (16, 0), (64, 64))),  # portrait: 64x96, 16 px cut top and bottom
        ((32, 32), CropInfo((32, 32), (0, 0), (64, 64))),  # small images are scaled up
        ((64, 64), CropInfo((64, 64), (0, 0), (64, 64))),
    ],
)
def test_resize_and_center_crop(size, expected):
    image, crop = resize_and_center_crop(Image.new("RGB", size, (1, 2, 3)), (64, 64))
    assert image.size == (64, 64)
    assert crop == expected


def test_the_crop_is_centered():
    image = Image.new("RGB", (160, 128), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 16, 128))  # a white band that the centered crop must cut away
    cropped, _ = resize_and_center_crop(image, (64, 64))
    assert max(cropped.getpixel((0, 32))) < 50  # dark (Lanczos spills a little); a left-aligned crop would be white


def test_exif_orientation_is_honoured(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the picture is upright when turned to 20x40
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40)


def test_transparency_is_flattened_onto_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((3, 3)) == (255, 255, 255)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(UserError, match="bad.jpg: cannot read this image"):
        load_rgb(tmp_path / "bad.jpg")


@pytest.fixture
def config(raw_config):
    return validate_config(raw_config)


def test_latents_are_vae_samples_times_the_scaling_factor(config):
    from lora_trainer.models import load_vae

    records = scan_datasets(config.datasets)[:3]
    cached = cache_latents(config, records, torch.device("cpu"), show_progress=False)
    vae = load_vae(config.model)
    for record, entry in zip(records, cached):
        latents = entry.load()
        assert latents.shape == (4, 8, 8) and latents.dtype == torch.float32
        image, _ = resize_and_center_crop(load_rgb(record.image_path), (64, 64))
        pixels = torch.from_numpy(__import__("numpy").asarray(image, dtype="float32") / 127.5 - 1).permute(2, 0, 1)
        with torch.no_grad():
            distribution = vae.encode(pixels[None]).latent_dist
        # A sample of the posterior: standardised, it looks like N(0, 1) noise.
        z = (latents / vae.config.scaling_factor - distribution.mean[0]) / distribution.std[0]
        assert z.abs().max() < 6 and 0.6 < z.std() < 1.4


def test_the_crop_reaches_time_ids(config):
    records = scan_datasets(config.datasets)
    cached = cache_latents(config, records, torch.device("cpu"), show_progress=False)
    dataset = LatentDataset(records, cached)
    by_name = {record.image_path.name: dataset[index] for index, (record, _) in enumerate(dataset.items)}
    # 01_blue_square.png is 160x128 (w x h): resized to 80x64, cut 8 px from the left.
    assert by_name["01_blue_square.png"]["time_ids"].tolist() == [128, 160, 0, 8, 64, 64]
    assert by_name["02_green_triangle.png"]["time_ids"].tolist() == [192, 128, 16, 0, 64, 64]
    assert by_name["01_blue_square.png"]["caption"] == "lts_shapes, a blue square, white background"


def test_repeats_multiply_the_epoch(config, raw_config):
    raw_config["datasets"][0]["repeats"] = 3
    config = validate_config(raw_config)
    records = scan_datasets(config.datasets)
    dataset = LatentDataset(records, cache_latents(config, records, torch.device("cpu"), show_progress=False))
    assert len(dataset) == 36


def test_cache_is_reused_and_an_edited_image_is_encoded_again(config, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "images"
    shutil.copytree(REPO / "datasets_example", data)
    config = config.model_copy(update={"datasets": [config.datasets[0].model_copy(update={"path": data})]})
    records = scan_datasets(config.datasets)
    first = cache_latents(config, records, torch.device("cpu"), show_progress=False)
    encoded = []
    import lora_trainer.data.cache as cache_module

    real = cache_module.encode_into_cache
    monkeypatch.setattr(cache_module, "encode_into_cache", lambda record, *a: encoded.append(record.image_path.name) or real(record, *a))
    assert [entry.path for entry in cache_latents(config, records, torch.device("cpu"), show_progress=False)] == [e.path for e in first]
    assert encoded == []

    edited = data / "03_yellow_circle.png"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(edited)
    stat = edited.stat()
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = cache_latents(config, records, torch.device("cpu"), show_progress=False)
    assert encoded == ["03_yellow_circle.png"]
    assert again[3].path != first[3].path


def test_a_damaged_cache_file_is_encoded_again(config):
    records = scan_datasets(config.datasets)[:2]
    first = cache_latents(config, records, torch.device("cpu"), show_progress=False)
    first[0].path.write_bytes(b"truncated")
    again = cache_latents(config, records, torch.device("cpu"), show_progress=False)
    assert again[0].load().shape == (4, 8, 8)


def test_nan_latents_are_refused_naming_the_image(config, tmp_path):
    class NanVae(torch.nn.Module):
        config = type("C", (), {"scaling_factor": 0.13025})()

        def encode(self, pixels):
            mean = torch.full((1, 4, 8, 8), float("nan"))
            return type("Out", (), {"latent_dist": type("D", (), {"sample": lambda self, generator=None: mean})()})()

    records = scan_datasets(config.datasets)[:1]
    cache = LatentCache(tmp_path / "c", "nan-vae", 64)
    with pytest.raises(UserError, match=f"{records[0].image_path}: the VAE produced NaN"):
        fill_latent_cache(records, cache, lambda: NanVae(), torch.device("cpu"), show_progress=False)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_captions_missing_files_warn_and_train_empty(tmp_path, raw_config, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("\n\n  first line  \nsecond line\n")
    raw_config["datasets"][0]["path"] = str(tmp_path)
    records = scan_datasets(validate_config(raw_config).datasets)
    assert [record.caption for record in records] == ["", "first line"]
    assert "1 of 2 images" in caplog.text and "a.png" in caplog.text


def test_encode_into_cache_writes_atomically(config, tmp_path):
    from lora_trainer.models import load_vae

    records = scan_datasets(config.datasets)[:1]
    cache = LatentCache(tmp_path / "c", "x", 64)
    encode_into_cache(records[0], cache, load_vae(config.model), torch.device("cpu"))
    assert [path.suffix for path in (tmp_path / "c").iterdir()] == [".safetensors"]
