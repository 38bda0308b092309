"""Loss masks, the data side (`objective.masked_loss`): a mask folder or the alpha channel, cut like its image,
averaged to the latent size, cached with the latents, checked against the images, batched as `loss_masks`."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_examples, run_cli, train_in_process, write_yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save

from lora_trainer.cache.latents import LatentCache, LatentRequest
from lora_trainer.cache.training_data import prepare_training_data
from lora_trainer.config.load import parse_config
from lora_trainer.config.model import ModelConfig
from lora_trainer.data.buckets import CropPlan
from lora_trainer.data.images import load_rgb
from lora_trainer.data.masks import check_mask_folders, latent_mask, with_loss_masks
from lora_trainer.data.records import ImageRecord, LossMask, scan_datasets
from lora_trainer.errors import ConfigError, UserError
import lora_trainer.fit.loop as loop_module
from lora_trainer.fit.loader import TrainingDataset, collate

CPU = torch.device("cpu")
RED = (200, 30, 30)


def block_means(pixels: np.ndarray) -> np.ndarray:
    """Each 8x8 block's mean, scaled to [0, 1]: the weight of the latent cell that encodes those pixels."""
    height, width = pixels.shape
    return pixels.reshape(height // 8, 8, width // 8, 8).mean(axis=(1, 3)) / 255.0


def white_columns(width: int, height: int, columns: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[:, :columns] = 255
    return mask


def random_mask(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(width * height).integers(0, 256, (height, width), dtype=np.uint8)


def write_image(folder: Path, name: str, size: tuple[int, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, RED).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"a red shape, {name}", encoding="utf-8")
    return folder / f"{name}.png"


def write_mask(folder: Path, name: str, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(folder / name)
    return folder / name


# Both images train in the 64x64 bucket at resolution 64: `wide` (96x64) is cut at columns 16..80, `square` is whole.
WIDE_MASK, SQUARE_MASK = random_mask(96, 64), white_columns(64, 64, 28)
EXPECTED = {"wide": block_means(WIDE_MASK[:, 16:80]), "square": block_means(SQUARE_MASK)}


@pytest.fixture
def masked_folders(tmp_path) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_image(images, "wide", (96, 64))
    write_image(images, "square", (64, 64))
    write_mask(masks, "wide.png", WIDE_MASK)
    write_mask(masks, "square.bmp", SQUARE_MASK)  # a mask may have another image extension than its image
    return images, masks


def masked_raw(raw_config: dict, images: Path, masks: Path | None = None, **dataset) -> dict:
    source = {"mask_dir": str(masks)} if masks is not None else {"alpha_mask": True}
    return {**raw_config, "datasets": [{"path": str(images), **source, **dataset}], "objective": {"masked_loss": True}}


@pytest.fixture(scope="module")
def vae(tiny_model_path):
    from lora_trainer.model.parts import load_sdxl

    return load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl")).vae


def prepare(config, vae):
    from lora_trainer.cache.latents import open_latent_cache

    return prepare_training_data(config, open_latent_cache(config, vae), CPU, show_progress=False)


def by_name(items) -> dict:
    return {item.record.image_path.stem: item for item in items}


def test_a_mask_becomes_the_mean_of_each_8x8_block_cut_and_mirrored_like_its_image(tmp_path):
    half = write_mask(tmp_path, "half.png", SQUARE_MASK)
    record = ImageRecord(tmp_path / "half.png", "", 0, "x", 1, False, 1.0, (64, 64), LossMask(half))
    whole = CropPlan((64, 64), (64, 64), (64, 64), (0, 0))
    mask = latent_mask(record, whole)
    assert mask.shape == (1, 8, 8) and mask.dtype == torch.float32
    # 28 white columns: latent columns 0-2 fully white, column 3 half (24..27 of 24..31), the rest black.
    assert mask[0, 0].tolist() == [1, 1, 1, 0.5, 0, 0, 0, 0]
    np.testing.assert_allclose(mask[0].numpy(), EXPECTED["square"], atol=1e-6)
    np.testing.assert_allclose(latent_mask(record, whole, flip=True)[0].numpy(), EXPECTED["square"][:, ::-1], atol=1e-6)

    wide = write_mask(tmp_path, "wide.png", WIDE_MASK)
    record = ImageRecord(tmp_path / "wide.png", "", 0, "x", 1, False, 1.0, (64, 96), LossMask(wide))
    cut = CropPlan((64, 96), (64, 96), (64, 64), (0, 16))
    np.testing.assert_allclose(latent_mask(record, cut)[0].numpy(), EXPECTED["wide"], atol=1e-6)
    np.testing.assert_allclose(latent_mask(record, cut, flip=True)[0].numpy(), EXPECTED["wide"][:, ::-1], atol=1e-6)


def test_the_cache_entry_holds_the_mask_both_ways_and_an_edited_mask_re_encodes(masked_folders, raw_config, vae):
    images, masks = masked_folders
    config = parse_config(masked_raw(raw_config, images, masks, flip_aug=True))
    data = prepare(config, vae)
    assert (data.latents.encoded, data.latents.reused) == (4, 0)
    for name, item in by_name(data.items).items():
        np.testing.assert_allclose(item.latent.load_mask()[0].numpy(), EXPECTED[name], atol=1e-6)
        np.testing.assert_allclose(item.flipped_latent.load_mask()[0].numpy(), EXPECTED[name][:, ::-1], atol=1e-6)
    before = {name: item.latent.path for name, item in by_name(data.items).items()}
    assert prepare(config, vae).latents.encoded == 0

    write_mask(masks, "wide.png", 255 - WIDE_MASK)
    again = prepare(config, vae)
    assert (again.latents.encoded, again.latents.reused) == (2, 2)  # the wide image, both orientations
    after = by_name(again.items)
    assert after["wide"].latent.path != before["wide"] and after["square"].latent.path == before["square"]
    np.testing.assert_allclose(after["wide"].latent.load_mask()[0].numpy(), 1 - EXPECTED["wide"], atol=1e-6)

    # A mask changed inside the cache file (its checksum no longer matching) is found and encoded again.
    path = after["square"].latent.path
    with safe_open(path, framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name).clone() for name in handle.keys()}
    tensors["loss_mask"][0, 0, 0] = 0.25
    path.write_bytes(save(tensors, metadata))
    repaired = prepare(config, vae)
    assert repaired.latents.repaired == [path] and repaired.latents.encoded == 1
    np.testing.assert_allclose(by_name(repaired.items)["square"].latent.load_mask()[0].numpy(), EXPECTED["square"], atol=1e-6)


def test_without_a_mask_the_cache_key_is_what_it_always_was(raw_config, vae, tmp_path):
    config = parse_config(raw_config)
    cache = LatentCache(tmp_path, vae, config.data.alpha_background)
    record = ImageRecord(tmp_path / "a.png", "", 0, "x", 1, False, 1.0, (64, 96))
    plan = CropPlan((64, 96), (64, 96), (64, 64), (0, 16))
    digest = "ab" * 32
    identity = {
        "format": 2, "image_sha256": digest, "plan": {"original": [64, 96], "resized": [64, 96], "bucket": [64, 64],
        "crop_top_left": [0, 16]}, "flip": False, "background": [255, 255, 255], "vae": cache.vae_fingerprint,
        "dtype": "torch.float32",
    }
    before_masks = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    request = LatentRequest(record, plan, flip=False)
    assert cache.key(request, digest) == before_masks
    keys = {cache.key(request, digest, mask) for mask in (None, "alpha", "cd" * 32, "ef" * 32)}
    assert len(keys) == 4  # a mask, and which one, changes the key


def test_without_the_latent_cache_the_loader_cuts_the_mask_itself_and_only_under_masked_loss(masked_folders, raw_config):
    images, masks = masked_folders
    config = parse_config(masked_raw(raw_config, images, masks, flip_aug=True, random_crop=True) | {
        "data": {**raw_config["data"], "cache_latents": False},
    })
    data = prepare_training_data(config, None, CPU, show_progress=False)
    dataset = TrainingDataset(data.items, config.datasets, 0, (255, 255, 255), masked_loss=True)
    wide = next(index for index, item in enumerate(data.items) if item.record.image_path.stem == "wide")
    orientations = set()
    for epoch in range(1, 16):  # random crops and flips: the mask follows the image's window, read from time_ids
        example = dataset[(wide, epoch)]
        left = int(example["time_ids"][3])  # a flipped image's window is given from the right edge (CropPlan.flipped)
        as_is, mirrored = block_means(WIDE_MASK[:, left : left + 64]), block_means(WIDE_MASK[:, 32 - left : 96 - left])[:, ::-1]
        mask = example["loss_mask"][0].numpy()
        matches = [np.allclose(mask, as_is, atol=1e-6), np.allclose(mask, mirrored, atol=1e-6)]
        assert any(matches), epoch
        orientations.add(matches.index(True))
    assert orientations == {0, 1}
    batch = collate([dataset[(index, 1)] for index in range(len(dataset))])
    assert batch["loss_masks"].shape == (2, 1, 8, 8)

    unmasked = TrainingDataset(data.items, config.datasets, 0, (255, 255, 255))
    assert "loss_masks" not in collate([unmasked[(index, 1)] for index in range(len(unmasked))])


def test_alpha_masks_and_the_background_both_apply(tmp_path, raw_config, vae, caplog):
    images = tmp_path / "images"
    alpha = np.zeros((64, 64), np.uint8)
    alpha[:, :40] = 255
    alpha[:16, 40:] = 128
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = RED
    rgba[..., 3] = alpha
    images.mkdir()
    Image.fromarray(rgba, mode="RGBA").save(images / "cutout.png")
    (images / "cutout.txt").write_text("a cutout")
    write_image(images, "opaque", (64, 64))
    raw = masked_raw(raw_config, images)
    raw["data"] = {**raw_config["data"], "alpha_background": [0, 128, 0]}
    config = parse_config(raw)

    caplog.set_level(logging.WARNING, logger="lora_trainer")
    data = prepare(config, vae)
    warnings = [record.getMessage() for record in caplog.records if "alpha" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("datasets.0.alpha_mask: 1 images have no alpha channel")
    assert "opaque.png" in warnings[0]
    items = by_name(data.items)
    np.testing.assert_allclose(items["cutout"].latent.load_mask()[0].numpy(), block_means(alpha), atol=1e-6)
    assert torch.equal(items["opaque"].latent.load_mask(), torch.ones(1, 8, 8))
    # What the VAE saw: opaque red where the mask trains, the background where it is fully transparent.
    seen = load_rgb(images / "cutout.png", config.data.alpha_background)
    assert seen.getpixel((10, 40)) == RED and seen.getpixel((50, 40)) == (0, 128, 0)


def test_masks_reach_the_training_step(masked_folders, raw_config, tmp_path, monkeypatch):
    images, masks = masked_folders
    plain = tmp_path / "plain"
    copy_examples(plain, 2)
    raw = masked_raw(raw_config, images, masks)
    raw["datasets"].append({"path": str(plain)})  # no masks: trains everywhere
    raw["training"].update(max_steps=2, batch_size=2)
    captions = {f"a red shape, {name}": torch.from_numpy(EXPECTED[name]).float()[None] for name in EXPECTED}
    real, seen, compared = loop_module.training_step, [], []

    def spy(unet, encode, scheduler, batch, noise, timesteps, **options):
        masks_in_batch = batch["loss_masks"]
        seen.append((list(batch["captions"]), masks_in_batch.detach().cpu().clone()))
        loss = real(unet, encode, scheduler, batch, noise, timesteps, **options)
        if not compared and not bool((masks_in_batch == 1).all()):  # once, on a batch with a real mask in it
            with torch.no_grad():
                ones = {**batch, "loss_masks": torch.ones_like(masks_in_batch)}
                unmasked = {key: value for key, value in batch.items() if key != "loss_masks"}
                others = [real(unet, encode, scheduler, other, noise, timesteps, **options) for other in (ones, unmasked)]
                compared.append([loss.detach(), *others])
        return loss

    monkeypatch.setattr(loop_module, "training_step", spy)
    train_in_process(raw)
    assert len(seen) == 2 and len(compared) == 1
    assert {caption for batch_captions, _ in seen for caption in batch_captions} >= set(captions)
    masked, with_ones, without = compared[0]
    torch.testing.assert_close(with_ones, without)  # a mask of ones is no mask
    assert not torch.allclose(masked, without)  # the mask reached the loss
    for batch_captions, batch_masks in seen:
        assert batch_masks.shape == (2, 1, 8, 8)
        for caption, mask in zip(batch_captions, batch_masks):
            expected = captions.get(caption, torch.ones(1, 8, 8))
            torch.testing.assert_close(mask, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("problem", ["no mask", "two masks", "also alpha_mask", "the image folder"])
def test_a_mask_folder_that_does_not_fit_stops_before_anything_loads(problem, masked_folders, raw_config, tmp_path, capsys):
    images, masks = masked_folders
    raw = masked_raw(raw_config, images, masks)
    if problem == "no mask":
        write_image(images, "cat_3", (64, 64))
        expected = f"datasets.0.mask_dir: no mask for image 'cat_3.png' (looked for cat_3.* in {masks.resolve()}); give each"
    elif problem == "two masks":
        write_mask(masks, "square.jpg", SQUARE_MASK)
        expected = f"datasets.0.mask_dir: 2 masks for image 'square.png' (square.bmp, square.jpg in {masks.resolve()}); keep one"
    elif problem == "also alpha_mask":
        raw["datasets"][0]["alpha_mask"] = True
        expected = "datasets.0.mask_dir: alpha_mask: true already takes each image's mask from its alpha channel"
    else:
        raw["datasets"][0]["mask_dir"] = str(images)
        expected = "datasets.0.mask_dir: is the image folder itself"
    path = write_yaml(tmp_path / "bad.yaml", raw)
    code, _, err = run_cli(["train", path], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {expected}"), err
    assert not (tmp_path / "out").exists()


def test_kohya_subfolders_are_mirrored_in_the_mask_folder(tmp_path, raw_config):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_image(images / "10_cat", "a", (64, 64))
    write_image(images / "2_dog", "b", (64, 64))
    write_mask(masks / "10_cat", "a.png", SQUARE_MASK)
    with pytest.raises(ConfigError, match=rf"no mask for image 'b\.png' \(looked for b\.\* in {masks.resolve() / '2_dog'}\)"):
        check_mask_folders(parse_config(masked_raw(raw_config, images, masks)).datasets, "config")
    write_mask(masks / "2_dog", "b.png", 255 - SQUARE_MASK)
    config = parse_config(masked_raw(raw_config, images, masks))
    records = with_loss_masks(scan_datasets(config.datasets).records, config.datasets)
    assert {record.image_path.name: record.loss_mask.file for record in records} == {
        "a.png": masks.resolve() / "10_cat" / "a.png", "b.png": masks.resolve() / "2_dog" / "b.png",
    }


def test_a_mask_of_another_size_is_an_error_naming_both_sizes(masked_folders, raw_config):
    images, masks = masked_folders
    config = parse_config(masked_raw(raw_config, images, masks))
    write_mask(masks, "square.bmp", white_columns(32, 48, 10))
    with pytest.raises(UserError) as error:
        with_loss_masks(scan_datasets(config.datasets).records, config.datasets)
    assert str(error.value) == (
        f"datasets.0.mask_dir: mask {masks.resolve() / 'square.bmp'} is 32x48 but its image square.png is 64x64; "
        "a mask must have its image's size"
    )


def test_a_mask_without_its_image_is_warned_about_and_unused(masked_folders, raw_config, caplog):
    images, masks = masked_folders
    write_mask(masks, "ghost.png", SQUARE_MASK)
    config = parse_config(masked_raw(raw_config, images, masks))
    records = with_loss_masks(scan_datasets(config.datasets).records, config.datasets)
    assert sorted(record.loss_mask.file.name for record in records) == ["square.bmp", "wide.png"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [f"datasets.0.mask_dir: 1 masks have no image of their name in {images.resolve()} and are not used (ghost.png)"]
