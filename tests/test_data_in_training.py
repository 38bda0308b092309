"""The data pipeline inside real (tiny) training runs: bad files, buckets, random crops, text cache, metadata."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import MIXED_SHAPES, copy_examples, run_cli, train_in_process, write_yaml
from PIL import Image

from lora_trainer.export.lora_file import read_lora_file


def test_bad_files_are_skipped_listed_and_the_rest_trains(raw_config, tmp_path, capsys):
    data = tmp_path / "data"
    copy_examples(data, 4)
    whole = (MIXED_SHAPES / "05_blue_triangle.png").read_bytes()
    (data / "broken.png").write_bytes(whole[: len(whole) * 2 // 3])  # the header reads; the pixels do not
    (data / "empty.jpg").write_bytes(b"")
    shutil.copy(MIXED_SHAPES / "06_green_circle.png", data / "latin.png")
    (data / "latin.txt").write_bytes("caf\xe9, cr\xe8me".encode("latin-1"))
    Image.new("RGB", (40, 40)).save(data / "tiny.png")  # below the smallest bucket side (64 here)
    raw_config["datasets"][0]["path"] = str(data)

    code, out, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 0, err
    assert f"skipped {data / 'broken.png'}: cannot read this image" in err
    assert f"skipped {data / 'empty.jpg'}: empty file (0 bytes)" in err
    assert f"skipped {data / 'latin.txt'}: caption is not UTF-8 text; re-save it as UTF-8" in err
    assert f"skipped {data / 'tiny.png'}: 40x40 is smaller than the smallest bucket side 64" in err
    assert "Traceback" not in err
    metadata = read_lora_file(tmp_path / "out" / "test_lora.safetensors").metadata
    assert metadata["ss_num_train_images"] == "4"


def test_a_dataset_of_only_bad_files_stops_before_training(raw_config, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.png").write_bytes(b"")
    raw_config["datasets"][0]["path"] = str(tmp_path / "data")
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: no usable training images are left")


def make_shapes(folder: Path, sizes: dict[str, tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        image = Image.new("RGB", size, (240, 240, 240))
        image.paste((200, 20, 20), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a red box, {name}", encoding="utf-8")


def test_mixed_aspect_ratios_train_in_their_own_buckets(raw_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lora_trainer")
    make_shapes(tmp_path / "data", {"wide1": (192, 64), "wide2": (180, 60), "square1": (64, 64), "square2": (70, 70), "tall": (64, 192)})
    raw_config["datasets"][0]["path"] = str(tmp_path / "data")
    raw_config["data"].update(resolution=64, bucket_step=32)
    raw_config["training"].update(max_steps=None, epochs=2, batch_size=2)
    seen_shapes, originals = [], set()
    import lora_trainer.fit.step as step_module

    real = step_module.training_step

    def spy(unet, encode, scheduler, batch, noise, timesteps, **options):
        seen_shapes.append((tuple(batch["latents"].shape), batch["time_ids"][:, 4:].tolist()))
        originals.update(tuple(row) for row in batch["time_ids"][:, :2].int().tolist())
        return real(unet, encode, scheduler, batch, noise, timesteps, **options)

    import lora_trainer.fit.loop as train_module

    train_module.training_step, saved = spy, train_module.training_step
    try:
        run, path = train_in_process(raw_config)
    finally:
        train_module.training_step = saved
    # 96x32 bucket for the wide pair (latents 4x12), 64x64 for the squares, 32x96 for the tall one.
    shapes = {shape[2:] for shape, _ in seen_shapes}
    assert shapes == {(4, 12), (8, 8), (12, 4)}
    for shape, targets in seen_shapes:
        assert all(target == [shape[2] * 8, shape[3] * 8] for target in targets)  # time_ids carry the bucket size
    assert originals == {(64, 192), (60, 180), (64, 64), (70, 70), (192, 64)}  # each image's own (height, width)
    assert "aspect-ratio buckets" in caplog.text and "96 x 32" in caplog.text
    metadata = read_lora_file(path).metadata
    info = json.loads(metadata["ss_bucket_info"])
    assert sorted((entry["resolution"][0], entry["resolution"][1], entry["count"]) for entry in info["buckets"].values()) == [
        (32, 96, 1), (64, 64, 2), (96, 32, 2),
    ]


def test_random_crop_needs_the_latent_cache_off(raw_config, tmp_path, capsys):
    raw_config["datasets"][0]["random_crop"] = True
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw_config)], capsys)
    assert code == 2
    assert err.strip() == (
        f"error: {tmp_path / 'c.yaml'}: datasets.0.random_crop: a random crop changes every epoch, so it cannot come "
        "from the latent cache; set data.cache_latents: false (the VAE then encodes every step) or drop random_crop"
    )


def test_without_the_latent_cache_the_vae_encodes_each_step_with_random_crops(raw_config, tmp_path):
    raw_config["datasets"][0]["random_crop"] = True
    raw_config["data"]["cache_latents"] = False
    run, path = train_in_process(raw_config)
    assert run.vae is not None and path.is_file()
    assert not (tmp_path / "cache" / "latents").exists()
    dataset = run.dataloader.dataset
    index = next(i for i, item in enumerate(dataset.items) if item.plan.resized != item.plan.bucket)
    crops = {tuple(dataset[(index, epoch)]["time_ids"][2:4].tolist()) for epoch in range(1, 30)}
    assert len(crops) > 3  # the window moves from epoch to epoch


def frozen_text_config(raw_config: dict) -> dict:
    raw_config["network"].update(train_text_encoder_1=False, train_text_encoder_2=False)
    return raw_config


def test_frozen_text_encoders_read_embeddings_from_the_disk_cache(raw_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lora_trainer")
    from lora_trainer.config.model import ModelConfig
    from lora_trainer.model.conditioning import live_caption_encoder
    from lora_trainer.model.parts import load_sdxl

    raw = frozen_text_config(raw_config)
    raw["datasets"][0].update(caption_dropout=0.5, caption_prefix="zqx")
    run, _ = train_in_process(raw)
    files = list((tmp_path / "cache" / "text").glob("*/*.safetensors"))
    assert len(files) == 12 + 1  # one per distinct caption, and the empty one for caption dropout
    assert "text embeddings: 0 reused, 13 encoded" in caplog.text

    text = load_sdxl(ModelConfig(pretrained="builtin:tiny-sdxl")).text
    live = live_caption_encoder(text.tokenizer_1, text.tokenizer_2, text.text_encoder_1, text.text_encoder_2, torch.device("cpu"))
    captions = ["zqx lts_shapes, a blue square, white background", ""]
    with torch.no_grad():
        expected = live(captions)
    for ours, reference in zip(run.encode_captions(captions), expected):
        torch.testing.assert_close(ours, reference)

    caplog.clear()
    from conftest import small_raw_config

    again = frozen_text_config(small_raw_config(tmp_path))
    again["datasets"][0].update(caption_dropout=0.5, caption_prefix="zqx")
    train_in_process(again)
    assert "text embeddings: 13 reused, 0 encoded" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"datasets.0.shuffle_tags": True}, "data.cache_text_embeddings: datasets.0 shuffles or drops tags"),
        ({"network.train_text_encoder_1": True}, "data.cache_text_embeddings: a text encoder that trains"),
    ],
)
def test_text_caching_is_refused_with_caption_randomness_or_a_training_encoder(raw_config, tmp_path, capsys, change, message):
    raw = frozen_text_config(raw_config)
    raw["data"]["cache_text_embeddings"] = True
    for key, value in change.items():
        section, *rest = key.split(".")
        target = raw[section][int(rest[0])] if rest[0].isdigit() else raw[section]
        target[rest[-1]] = value
    code, _, err = run_cli(["train", write_yaml(tmp_path / "c.yaml", raw)], capsys)
    assert code == 2 and message in err


def test_shuffled_captions_with_frozen_encoders_are_encoded_live(raw_config, tmp_path):
    raw = frozen_text_config(raw_config)
    raw["datasets"][0]["shuffle_tags"] = True
    run, path = train_in_process(raw)
    assert path.is_file() and not (tmp_path / "cache" / "text").exists()


def test_regularization_images_and_metadata(raw_config, tmp_path):
    train_folder, reg_folder = tmp_path / "img" / "5_zqx shape", tmp_path / "reg" / "1_shape"
    copy_examples(train_folder, 3)
    copy_examples(reg_folder, 6)
    for caption in train_folder.glob("*.txt"):
        caption.unlink()  # class tokens from the folder name
    raw_config["datasets"] = [
        {"path": str(tmp_path / "img")},
        {"path": str(tmp_path / "reg"), "is_reg": True, "loss_weight": 0.5},
    ]
    run, path = train_in_process(raw_config)
    metadata = read_lora_file(path).metadata
    assert json.loads(metadata["ss_dataset_dirs"]) == {"5_zqx shape": {"n_repeats": 5, "img_count": 3}}
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 1, "img_count": 6}}
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"]) == ("15", "6")
    assert json.loads(metadata["ss_tag_frequency"])["5_zqx shape"] == {"zqx shape": 3}
    assert metadata["ss_resolution"] == "(64, 64)"
    dataset = run.dataloader.dataset
    assert len(dataset) == 30  # 15 training items and as many regularization items
    weights = sorted({dataset[(index, 1)]["loss_weight"].item() for index in range(len(dataset))})
    assert weights == [0.5, 1.0]
