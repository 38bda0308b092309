"""Captions (file, default, class tokens; shuffle, keep_tokens, dropout, prefix/suffix) and kohya folder layouts."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.cache.training_data import TrainingItem
from lora_trainer.config.data import DatasetConfig
from lora_trainer.data.buckets import CropPlan
from lora_trainer.data.captions import training_caption
from lora_trainer.data.epochs import epoch_items
from lora_trainer.data.records import ImageRecord, scan_datasets
from lora_trainer.fit.loader import TrainingDataset

TAGS = "a, b, c, d, e, f, g, h"


def options(tmp_path: Path, **fields) -> DatasetConfig:
    return DatasetConfig(path=tmp_path, **fields)


def draws(caption: str, dataset: DatasetConfig, count: int) -> list[str]:
    return [training_caption(caption, dataset, random.Random(seed)) for seed in range(count)]


def within_four_sigma(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_shuffle_keeps_the_first_keep_tokens_in_place(tmp_path):
    results = draws(TAGS, options(tmp_path, shuffle_tags=True, keep_tokens=2), 300)
    for caption in results:
        tags = caption.split(", ")
        assert tags[:2] == ["a", "b"] and sorted(tags[2:]) == list("cdefgh")
    assert len(set(results)) > 100  # 720 orders of the other six; 300 draws find many


def test_caption_dropout_rate_holds(tmp_path):
    results = draws(TAGS, options(tmp_path, caption_dropout=0.3, caption_prefix="ohwx"), 4000)
    assert within_four_sigma(results.count("") / 4000, 0.3, 4000)
    assert all(caption == f"ohwx {TAGS}" for caption in results if caption)  # nothing else changes


def test_tag_dropout_rate_holds_and_spares_the_kept_tags(tmp_path):
    results = draws(TAGS, options(tmp_path, tag_dropout=0.2, keep_tokens=1), 2000)
    assert all(caption.startswith("a") for caption in results)
    dropped = sum(7 - (len(caption.split(", ")) - 1) for caption in results)
    assert within_four_sigma(dropped / (7 * 2000), 0.2, 7 * 2000)
    # Without shuffling, the surviving tags keep their order.
    assert all(caption.split(", ") == sorted(caption.split(", ")) for caption in results)


def test_prefix_stays_first_and_suffix_last_when_tags_shuffle(tmp_path):
    dataset = options(tmp_path, shuffle_tags=True, caption_prefix="ohwx,", caption_suffix="masterpiece")
    for caption in draws("cat, hat, red", dataset, 50):
        assert caption.startswith("ohwx, ") and caption.endswith(" masterpiece")


def test_another_separator_is_honoured(tmp_path):
    results = draws("x | y | z", options(tmp_path, shuffle_tags=True, tag_separator="|"), 40)
    assert {tuple(sorted(caption.split(" | "))) for caption in results} == {("x", "y", "z")}


def save_image(path: Path, size=(96, 96), caption: str | None = None, caption_suffix: str = ".txt") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if caption is not None:
        path.with_suffix(caption_suffix).write_text(caption, encoding="utf-8")
    return path


def test_kohya_folder_names_give_repeats_and_class_tokens(tmp_path):
    folder = tmp_path / "10_ohwx woman"
    save_image(folder / "a.png")  # no caption: class tokens
    save_image(folder / "b.png", caption="ohwx woman, smiling")
    save_image(folder / "c.jpg", caption="tagged differently", caption_suffix=".caption")  # kohya's other extension
    scan = scan_datasets([DatasetConfig(path=folder)])
    assert [(record.image_path.name, record.caption) for record in scan.records] == [
        ("a.png", "ohwx woman"),
        ("b.png", "ohwx woman, smiling"),
        ("c.jpg", "tagged differently"),
    ]
    assert {record.repeats for record in scan.records} == {10}
    assert {record.folder for record in scan.records} == {"10_ohwx woman"}


def test_explicit_settings_win_over_the_folder_name(tmp_path):
    folder = tmp_path / "10_ohwx"
    save_image(folder / "a.png")
    scan = scan_datasets([DatasetConfig(path=folder, repeats=2, default_caption="a photo")])
    assert [(record.caption, record.repeats) for record in scan.records] == [("a photo", 2)]


def test_a_parent_folder_trains_its_kohya_subfolders(tmp_path):
    save_image(tmp_path / "img" / "10_alice" / "1.png")
    save_image(tmp_path / "img" / "3_bob" / "1.png")
    save_image(tmp_path / "img" / "3_bob" / "2.webp")
    (tmp_path / "img" / "notes").mkdir()  # not N_name: ignored
    scan = scan_datasets([DatasetConfig(path=tmp_path / "img")])
    assert [(folder.path.name, folder.repeats, folder.class_tokens) for folder in scan.folders] == [
        ("10_alice", 10, "alice"),
        ("3_bob", 3, "bob"),
    ]
    assert [record.caption for record in scan.records] == ["alice", "bob", "bob"]


def test_every_image_kind_is_found_and_sized_upright(tmp_path):
    for extension in ("png", "jpg", "jpeg", "webp", "bmp"):
        save_image(tmp_path / f"x.{extension}", size=(80, 64))
    rotated = Image.new("RGB", (80, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "y.jpg", exif=exif)
    (tmp_path / ".hidden.png").write_bytes(b"macOS resource fork")
    scan = scan_datasets([DatasetConfig(path=tmp_path)])
    assert sorted(record.image_path.name for record in scan.records) == ["x.bmp", "x.jpeg", "x.jpg", "x.png", "x.webp", "y.jpg"]
    assert {record.image_path.name: record.size for record in scan.records}["y.jpg"] == (80, 64)
    assert {record.image_path.name: record.size for record in scan.records}["x.png"] == (64, 80)


def record(name: str, is_reg: bool = False, repeats: int = 1, weight: float = 1.0) -> ImageRecord:
    return ImageRecord(Path(name), name, 0, "f", repeats, is_reg, weight, (64, 64))


def item(name: str, **fields) -> TrainingItem:
    return TrainingItem(record(name, **fields), CropPlan((64, 64), (64, 64), (64, 64), (0, 0)))


def test_regularization_images_match_the_training_count_per_epoch():
    training = [item("t1", repeats=3), item("t2", repeats=3)]
    many_reg = [item(f"r{index}", is_reg=True) for index in range(10)]
    chosen = epoch_items(training + many_reg, seed=0)
    assert len(chosen) == 12 and sum(entry.record.is_reg for entry in chosen) == 6
    assert len({entry.record.image_path for entry in chosen if entry.record.is_reg}) == 6  # distinct, not one repeated
    few_reg = [item("r0", is_reg=True)]
    assert [entry.record.image_path.name for entry in epoch_items(training + few_reg, 0)][6:] == ["r0"] * 6
    assert epoch_items(training + many_reg, 0) == epoch_items(training + many_reg, 0)


def test_dataset_items_draw_their_randomness_from_seed_epoch_and_index(tmp_path):
    dataset_options = DatasetConfig(path=tmp_path, shuffle_tags=True, flip_aug=True)
    entry = TrainingItem(record(TAGS), CropPlan((64, 64), (64, 64), (64, 64), (0, 0)))
    dataset = TrainingDataset([entry], [dataset_options], seed=3, background=(255, 255, 255))

    def caption(epoch: int) -> str:
        rng = random.Random(f"item:3:{epoch}:0")
        rng.random()  # the flip draw comes first
        return training_caption(TAGS, dataset_options, rng)

    dataset.items = [TrainingItem(entry.record, entry.plan, latent=_Fake("up"), flipped_latent=_Fake("mirror"))]
    first, again, later = dataset[(0, 1)], dataset[(0, 1)], [dataset[(0, epoch)] for epoch in range(2, 40)]
    assert first["caption"] == again["caption"] == caption(1)
    assert len({example["caption"] for example in later}) > 10
    assert {example["latents"] for example in later} == {"up", "mirror"}


class _Fake:
    def __init__(self, value: str):
        self.value = value

    def load(self) -> str:
        return self.value


def test_a_kohya_option_name_points_to_ours(raw_config):
    from lora_trainer.config.load import parse_config
    from lora_trainer.errors import ConfigError

    raw_config["datasets"][0]["shuffle_caption"] = True
    with pytest.raises(ConfigError, match=r"datasets\.0\.shuffle_caption: unknown field 'shuffle_caption'; kohya's shuffle_caption is datasets\.N\.shuffle_tags"):
        parse_config(raw_config)
