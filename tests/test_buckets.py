"""Aspect-ratio buckets: which bucket and crop each image gets, the bucket list's shape, and batch order."""

from __future__ import annotations

import random

import pytest

from lora_trainer.config.data import DataConfig
from lora_trainer.data.buckets import CropPlan, ImageTooSmall, bucket_sizes, plan_for, random_crop
from lora_trainer.fit.batches import BucketBatches

SDXL = DataConfig(resolution=1024)  # step 64, sides 256..2048
SDXL_BUCKETS = bucket_sizes(1024, 64, 256, 2048)


# (width, height) of the image -> the plan, worked out by hand:
#   nearest aspect ratio among the buckets, scale = max(bucket_h / h, bucket_w / w), centered crop.
@pytest.mark.parametrize(
    "width, height, expected",
    [
        # 16:9 (1.778) -> 1344x768 (1.75; 1280x768 is 1.667); scale 768/1080 -> 1365x768, 21 px spare, 10 cut left.
        (1920, 1080, CropPlan((1080, 1920), (768, 1365), (768, 1344), (0, 10))),
        # 3:2 (1.5) -> 1216x832 (1.46); scale 832/2000 = 0.416 -> 1248x832, 16 px cut left.
        (3000, 2000, CropPlan((2000, 3000), (832, 1248), (832, 1216), (0, 16))),
        # Exactly a bucket's shape and size: no resize, no crop.
        (832, 1216, CropPlan((1216, 832), (1216, 832), (1216, 832), (0, 0))),
        # Square, smaller than the resolution: scaled up to 1024.
        (1000, 1000, CropPlan((1000, 1000), (1024, 1024), (1024, 1024), (0, 0))),
        # 1:4 portrait -> 512x2048; 600x2400 is scaled by 0.8533 to 512x2048 exactly.
        (600, 2400, CropPlan((2400, 600), (2048, 512), (2048, 512), (0, 0))),
        # 4:5 portrait (0.8) -> 896x1152 (0.778); scale max(1152/1250, 896/1000) = 0.9216 -> 922x1152, 13 px cut left.
        (1000, 1250, CropPlan((1250, 1000), (1152, 922), (1152, 896), (0, 13))),
    ],
)
def test_images_go_to_the_nearest_bucket_and_are_cropped_in_the_middle(width, height, expected):
    assert plan_for((height, width), SDXL_BUCKETS, SDXL) == expected


def test_every_bucket_has_step_sides_and_about_resolution_squared_pixels():
    for resolution, step, low, high in [(1024, 64, 256, 2048), (512, 32, 256, 1024), (768, 64, 384, 1536)]:
        sizes = bucket_sizes(resolution, step, low, high)
        assert (resolution, resolution) in sizes
        for height, width in sizes:
            assert height % step == 0 and width % step == 0
            assert low <= min(height, width) and max(height, width) <= high
            # No bucket costs more memory than the square; none is more than one step-wide strip smaller.
            assert resolution**2 - step * max(height, width) < height * width <= resolution**2
            assert (width, height) in sizes  # portrait and landscape alike


def test_sdxl_buckets_include_the_well_known_sizes():
    for width, height in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (832, 1216), (768, 1344)]:
        assert (height, width) in SDXL_BUCKETS


def test_without_upscaling_a_small_image_keeps_its_own_size():
    data = DataConfig(resolution=1024, bucket_no_upscale=True)
    # 800x600 would need 1152x896; instead its own size, rounded down to 64: 768x576, scale 0.96.
    assert plan_for((600, 800), SDXL_BUCKETS, data) == CropPlan((600, 800), (576, 768), (576, 768), (0, 0))
    # A large image still goes to a regular bucket (scaling down is fine).
    assert plan_for((2000, 3000), SDXL_BUCKETS, data).bucket == (832, 1216)


def test_an_image_below_the_smallest_bucket_side_is_too_small():
    with pytest.raises(ImageTooSmall, match=r"200x300 is smaller than the smallest bucket side 256"):
        plan_for((300, 200), SDXL_BUCKETS, SDXL)


def test_without_buckets_every_image_is_a_centered_square():
    data = DataConfig(resolution=1024, buckets=False)
    assert plan_for((1080, 1920), SDXL_BUCKETS, data) == CropPlan((1080, 1920), (1024, 1820), (1024, 1024), (0, 398))


def test_random_crop_stays_inside_and_is_reproducible():
    plan = CropPlan((1080, 1920), (768, 1365), (768, 1344), (0, 10))
    crops = [random_crop(plan, random.Random(seed)).crop_top_left for seed in range(200)]
    assert all(top == 0 and 0 <= left <= 21 for top, left in crops)
    assert len(set(crops)) > 10
    assert random_crop(plan, random.Random(7)) == random_crop(plan, random.Random(7))


def test_a_flipped_plan_measures_the_crop_from_the_other_edge():
    plan = CropPlan((1080, 1920), (768, 1365), (768, 1344), (0, 4))
    assert plan.flipped().crop_top_left == (0, 17)  # 21 spare pixels: 4 on the left are 17 on the right


BUCKETS = [(64, 64)] * 7 + [(32, 96)] * 5 + [(96, 32)] * 3


def test_batches_never_mix_buckets_and_cover_each_item_once_per_epoch():
    sampler = BucketBatches(BUCKETS, batch_size=2, seed=0)
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 4 + 3 + 2
        assert all(key.epoch == epoch for batch in batches for key in batch)
        indices = [key.index for batch in batches for key in batch]
        assert sorted(indices) == list(range(len(BUCKETS)))
        assert all(len({BUCKETS[key.index] for key in batch}) == 1 for batch in batches)


def test_order_is_reproducible_from_the_seed_and_changes_every_epoch():
    def order(seed: int, epoch: int) -> list:
        sampler = BucketBatches(BUCKETS, batch_size=2, seed=seed)
        sampler.set_epoch(epoch)
        return [key.index for batch in sampler for key in batch]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)
    # Buckets are interleaved, not trained one after another.
    first_buckets = [BUCKETS[batch[0]] for batch in BucketBatches(BUCKETS, 2, 0).epoch_batches(1)]
    changes = sum(a != b for a, b in zip(first_buckets, first_buckets[1:]))
    assert changes >= 3


def test_iterating_again_moves_to_the_next_epoch():
    sampler = BucketBatches(BUCKETS, batch_size=2, seed=0)
    first, second = list(sampler), list(sampler)
    assert {key.epoch for batch in first for key in batch} == {1}
    assert {key.epoch for batch in second for key in batch} == {2}


def test_processes_share_an_epoch_evenly_without_mixing_buckets():
    shards = []
    for rank in range(4):
        sampler = BucketBatches(BUCKETS, batch_size=2, seed=0, num_processes=4, process_index=rank)
        shards.append(list(sampler))
    assert {len(shard) for shard in shards} == {3}  # 9 batches padded to 12 so every process steps alike
    seen = {key.index for shard in shards for batch in shard for key in batch}
    assert seen == set(range(len(BUCKETS)))
    assert all(len({BUCKETS[key.index] for key in batch}) == 1 for shard in shards for batch in shard)
