"""Files a new user really has: huge photos and panoramas, 16-bit PNGs, GIFs and animations, empty captions.

Each is either trained on correctly or listed with its reason before training; none stops the run with a
traceback, and none is used silently in a way the user would not expect.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from PIL.JpegImagePlugin import JpegImageFile

from lora_trainer.config.data import DataConfig, DatasetConfig
from lora_trainer.data import images, records
from lora_trainer.data.buckets import bucket_sizes, plan_for
from lora_trainer.data.images import (
    UnreadableImage,
    apply_plan,
    load_rgb,
    sixteen_to_eight_bits,
    to_rgb,
)
from lora_trainer.data.records import BadFile, read_header, scan_datasets

PILLOW_ERROR_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # above this Pillow raises DecompressionBombError
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def plan_of(size: tuple[int, int]):
    data = DataConfig()
    return plan_for(size, bucket_sizes(data.resolution, data.bucket_step, data.smallest_side, data.largest_side), data)


def scan(folder: Path, **fields):
    return scan_datasets([DatasetConfig(path=folder, **fields)])


def warnings_of(caplog) -> list[str]:
    return [entry.getMessage() for entry in caplog.records if entry.name == records.log.name]


# --- 1. images over Pillow's decompression-bomb limit --------------------------------------------------


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    """A real 180-megapixel JPEG, above Pillow's 179 MP error limit: grey with a dark block at the top left.

    Grayscale and mostly uniform, it takes about half a second and 180 MB to make.
    """
    path = tmp_path_factory.mktemp("huge") / "panorama.jpg"
    picture = Image.new("L", (15000, 12000), 128)
    ImageDraw.Draw(picture).rectangle((0, 0, 7499, 5999), fill=20)
    picture.save(path, quality=80)
    return path


@pytest.mark.filterwarnings("error")  # Pillow's DecompressionBombWarning must not reach the user either
def test_a_photo_over_pillows_limit_is_scanned_and_loaded_downscaled(huge_jpeg):
    assert 15000 * 12000 > PILLOW_ERROR_PIXELS
    pillow_limit = Image.MAX_IMAGE_PIXELS
    header = read_header(huge_jpeg)
    assert header.size == (12000, 15000) and not header.animated
    plan = plan_of(header.size)
    picture = load_rgb(huge_jpeg, size=plan.resized)
    assert picture.size == (plan.resized[1], plan.resized[0]) and picture.mode == "RGB"
    cropped = np.asarray(apply_plan(picture, plan))
    assert cropped.shape == (*plan.bucket, 3)
    assert abs(int(cropped[10, 10, 0]) - 20) <= 2 and abs(int(cropped[-10, -10, 0]) - 128) <= 2
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # lifted only while our reader used it


def test_pillows_limit_is_not_ours_and_is_put_back(tmp_path, monkeypatch):
    """A lower Pillow limit provokes the same refusal cheaply: we read past it and leave it as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (300, 200), GREEN).save(tmp_path / "photo.png")
    (tmp_path / "photo.txt").write_text("a photo")
    found = scan(tmp_path)
    assert not found.bad and found.records[0].size == (200, 300)
    assert load_rgb(tmp_path / "photo.png").getpixel((5, 5)) == GREEN
    assert Image.MAX_IMAGE_PIXELS == 1000


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels (1-bit grey) but holds almost none: enough to read its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_an_image_over_our_own_limit_is_a_bad_file_naming_its_megapixels(tmp_path):
    png_header_only(tmp_path / "gigapan.png", 40000, 30000)  # 1,200 megapixels, a few bytes on disk
    (tmp_path / "gigapan.txt").write_text("a city")
    Image.new("RGB", (64, 64)).save(tmp_path / "fine.png")
    found = scan(tmp_path)
    assert [record.image_path.name for record in found.records] == ["fine.png"]
    [bad] = found.bad
    assert bad.path.name == "gigapan.png"
    assert "40000x30000 is 1,200 megapixels, over the limit of 1,000 megapixels" in bad.reason
    assert "downscale" in bad.reason
    with pytest.raises(UnreadableImage, match="1,200 megapixels"):
        load_rgb(tmp_path / "gigapan.png")


def detailed_photo(width: int, height: int) -> Image.Image:
    """Gradients and sharp-edged shapes, so a crop that lands a pixel off would show."""
    across = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    down = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    channels = np.broadcast_arrays(across, down, (across + down) / 2)
    picture = Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for index in range(12):
        left, top = index * width // 13, (index * 7 % 11) * height // 12
        draw.rectangle((left, top, left + width // 20, top + height // 15), fill=(255 * (index % 2), 40, 200))
    return picture


@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_a_drafted_jpeg_crops_like_the_full_decode(tmp_path, monkeypatch, orientation):
    """Decoded at reduced scale, the picture still lands in the plan's window where the full decode puts it."""
    path = tmp_path / "big.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    detailed_photo(2403, 1799).save(path, quality=95, exif=exif)  # sides not multiples of 8: padded last blocks
    monkeypatch.setattr(images, "DRAFT_ABOVE_PIXELS", 1_000_000)  # treat this 4 MP photo as very large
    scales = []
    original_draft = JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = original_draft(self, mode, size)
        scales.append(self.decoderconfig[0])
        return result

    monkeypatch.setattr(JpegImageFile, "draft", recording_draft)
    plan = plan_of(read_header(path).size)
    drafted = np.asarray(apply_plan(load_rgb(path, size=plan.resized), plan), dtype=np.int16)
    assert scales == [2]  # 2403x1799 down to a 1024-ish bucket: half scale still covers it
    full = np.asarray(apply_plan(load_rgb(path), plan), dtype=np.int16)
    difference = np.abs(drafted - full)
    # About 0.11 here; a crop one pixel off, or ignoring the decoder's box of the padded last block, is 0.23-0.34.
    assert difference.mean() < 0.2 and np.percentile(difference, 99) <= 2


def test_ordinary_photos_are_not_drafted_and_keep_their_pixels(tmp_path):
    path = tmp_path / "photo.jpg"
    detailed_photo(2000, 1500).save(path, quality=90)
    plan = plan_of((1500, 2000))
    sized = apply_plan(load_rgb(path, size=plan.resized), plan)
    assert np.array_equal(np.asarray(sized), np.asarray(apply_plan(load_rgb(path), plan)))


# --- 2. 16-bit grayscale ------------------------------------------------------------------------------

EVERY_16_BIT_VALUE = np.arange(65536, dtype=np.uint16).reshape(256, 256)
AS_8_BITS = np.floor(EVERY_16_BIT_VALUE / 257 + 0.5).astype(np.uint8)  # 257 is odd: never a tie


def test_a_16_bit_gradient_png_loads_as_the_matching_8_bit_gradient(tmp_path):
    Image.fromarray(EVERY_16_BIT_VALUE).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    rgb = np.asarray(load_rgb(tmp_path / "depth.png"))
    assert all(np.array_equal(rgb[..., channel], AS_8_BITS) for channel in range(3))
    assert rgb.min() == 0 and rgb.max() == 255 and rgb.mean() == pytest.approx(127.5, abs=0.5)  # not near-white


def test_big_endian_and_32_bit_integer_modes_are_scaled_the_same_way():
    big_endian = Image.frombytes("I;16B", (256, 256), EVERY_16_BIT_VALUE.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(sixteen_to_eight_bits(big_endian)), AS_8_BITS)
    integers = Image.fromarray(np.array([[-5, 0, 257, 65535, 70000]], dtype=np.int32))
    assert integers.mode == "I"
    assert np.asarray(to_rgb(integers))[0, :, 0].tolist() == [0, 0, 1, 255, 255]  # outside 0..65535: clipped


def test_float_pixels_are_refused_with_a_reason():
    with pytest.raises(UnreadableImage, match="32-bit floats .* save it as an 8- or 16-bit PNG"):
        to_rgb(Image.new("F", (4, 4), 0.5))


# --- 3. GIF, animations, and files that only look like images -----------------------------------------


def frames(*colours) -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), colour) for colour in colours]


def save_animation(path: Path, *colours) -> None:
    first, *rest = frames(*colours)
    first.save(path, save_all=True, append_images=rest, duration=100, loop=0)
    path.with_suffix(".txt").write_text(f"{path.stem} animation")


def test_animations_train_on_their_first_frame_and_are_listed_once(tmp_path, caplog):
    save_animation(tmp_path / "a.gif", RED, GREEN, BLUE)
    save_animation(tmp_path / "b.png", RED, BLUE)  # APNG
    save_animation(tmp_path / "c.webp", RED, GREEN)
    Image.new("RGB", (64, 64), GREEN).save(tmp_path / "still.gif")
    (tmp_path / "still.txt").write_text("a still gif")
    caplog.set_level(logging.WARNING, logger=records.log.name)
    found = scan(tmp_path)
    assert not found.bad
    assert {record.image_path.name: record.caption for record in found.records} == {
        "a.gif": "a animation", "b.png": "b animation", "c.webp": "c animation", "still.gif": "a still gif",
    }
    [line] = warnings_of(caplog)
    assert line.startswith("3 animated images in ") and "train on their first frame only (a.gif, b.png, c.webp)" in line
    for name in ("a.gif", "b.png", "c.webp"):
        assert max(abs(got - want) for got, want in zip(load_rgb(tmp_path / name).getpixel((32, 32)), RED)) <= 8
    assert load_rgb(tmp_path / "still.gif").getpixel((32, 32)) == GREEN


def test_a_long_list_of_animations_names_the_first_few(tmp_path, caplog):
    for index in range(5):
        save_animation(tmp_path / f"{index}.gif", RED, BLUE)
    caplog.set_level(logging.WARNING, logger=records.log.name)
    scan(tmp_path)
    assert "(0.gif, 1.gif, 2.gif and 2 more)" in warnings_of(caplog)[0]


def test_a_multi_frame_jpeg_is_a_photo_not_an_animation(tmp_path, caplog):
    """Phones store a depth map or preview as a second JPEG frame (MPO): that is no animation to warn about."""
    photo, depth = frames(RED, BLUE)
    photo.save(tmp_path / "portrait.jpg", format="MPO", save_all=True, append_images=[depth])
    (tmp_path / "portrait.txt").write_text("a portrait")
    caplog.set_level(logging.WARNING, logger=records.log.name)
    found = scan(tmp_path)
    assert len(found.records) == 1 and not warnings_of(caplog)


def test_files_that_only_look_like_images_are_still_bad_files_and_other_types_still_ignored(tmp_path):
    Image.new("RGB", (64, 64), RED).save(tmp_path / "real.png")
    (tmp_path / "notes.gif").write_text("not a picture at all")
    (tmp_path / "notes.txt").write_text("a caption for it")
    Image.new("RGB", (64, 64)).save(tmp_path / "scan.tif")  # Pillow reads TIFF, but it is not a listed type
    (tmp_path / "scan.txt").write_text("a tiff")
    Image.new("RGB", (64, 64), BLUE).save(tmp_path / "misnamed.png", format="GIF")  # named by content, not extension
    found = scan(tmp_path)
    assert sorted(record.image_path.name for record in found.records) == ["misnamed.png", "real.png"]
    [bad] = found.bad
    assert bad.path.name == "notes.gif" and bad.reason.startswith("cannot read this image")
    assert isinstance(read_header(tmp_path / "notes.gif"), BadFile)


# --- 4. empty caption files ---------------------------------------------------------------------------


def captioned_folder(folder: Path, captions: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for stem, text in captions.items():
        Image.new("RGB", (64, 64)).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(text)
    return folder


def test_empty_caption_files_train_with_the_folders_fallback_caption_and_are_listed(tmp_path, caplog):
    folder = captioned_folder(tmp_path / "10_ohwx woman", {"a": "", "b": "  \n\n", "c": "ohwx woman, smiling"})
    caplog.set_level(logging.WARNING, logger=records.log.name)
    found = scan(folder)
    assert {record.image_path.name: record.caption for record in found.records} == {
        "a.png": "ohwx woman", "b.png": "ohwx woman", "c.png": "ohwx woman, smiling",
    }
    [line] = warnings_of(caplog)
    assert line.startswith(f"2 caption files in {folder} are empty")
    assert "train with the folder's fallback caption 'ohwx woman' (a.txt, b.txt); write a caption in them" in line


def test_empty_caption_files_use_the_default_caption_before_class_tokens(tmp_path):
    folder = captioned_folder(tmp_path / "3_ohwx", {"a": "\n"})
    assert scan(folder, default_caption="a photo").records[0].caption == "a photo"


def test_empty_caption_files_without_a_fallback_train_uncaptioned_and_say_so(tmp_path, caplog):
    folder = captioned_folder(tmp_path / "plain", {"a": "", "b": "a dog"})
    caplog.set_level(logging.WARNING, logger=records.log.name)
    found = scan(folder)
    assert [record.caption for record in found.records] == ["", "a dog"]
    [line] = warnings_of(caplog)
    assert "1 caption files" in line
    assert "an empty caption (the folder has no default_caption or class tokens) (a.txt)" in line
