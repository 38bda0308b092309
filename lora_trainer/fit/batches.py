"""Batches that never mix buckets, shuffled within and across buckets each epoch, reproducibly from the seed.

`BucketBatches`, the data loader's batch sampler, yields lists of `DataKey`s, so the dataset can draw
each item's random choices (caption shuffle, flip) from a generator seeded by seed, epoch and item: the
same run twice sees the same data, whatever the number of data-loader workers.

An epoch is a list of *global batches*: `batch_size x processes` items of one bucket, which the
processes split between them. Single-process batch 4 and four processes of batch 1 thus train on the
same images at every step, and a data position (global batches done in the epoch) means the same thing
whatever the number of processes, so a run can resume on another number of GPUs. Each item's slot in
its global batch names its noise and timestep (`noise_seed`), so those do not depend on the process
layout either. Accelerate's own sharding is not used: it pads uneven batches with samples from other
batches, which would mix bucket sizes in one tensor.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from torch.utils.data import Sampler

from lora_trainer.data.buckets import Size


class DataKey(NamedTuple):
    """What the dataset needs to produce one training example and its noise."""

    index: int  # the item in the epoch's item list
    epoch: int
    batch: int  # the global batch's position in the epoch
    slot: int  # the item's position in its global batch


class BucketBatches(Sampler[list[DataKey]]):
    def __init__(self, buckets: Sequence[Size], batch_size: int, seed: int, num_processes: int = 1, process_index: int = 0):
        self.by_bucket: dict[Size, list[int]] = defaultdict(list)
        for index, bucket in enumerate(buckets):
            self.by_bucket[bucket].append(index)
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.epoch = 1
        self.resume_point: tuple[int, int] | None = None  # (epoch, global batches already trained in it)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Skip the first `batches_done` global batches of `epoch` (read nothing for them)."""
        self.resume_point = (epoch, batches_done)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of an epoch, in training order; each splits evenly between the processes."""
        rng = random.Random(f"buckets:{self.seed}:{epoch}")
        size, processes = self.global_batch_size, self.num_processes
        batches = []
        for bucket in sorted(self.by_bucket):
            indices = list(self.by_bucket[bucket])
            rng.shuffle(indices)
            for start in range(0, len(indices), size):
                batch = indices[start : start + size]
                # A bucket's short last batch is filled from the same bucket up to a multiple of the process
                # count, so every process gets as many images (DDP's mean then equals the global mean).
                shortfall = -len(batch) % processes
                batches.append(batch + [indices[offset % len(indices)] for offset in range(shortfall)])
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[DataKey]]:
        epoch = self.epoch
        batches = self.epoch_batches(epoch)
        first = self._skipped(epoch)
        for position in range(first, len(batches)):
            batch = batches[position]
            share = len(batch) // self.num_processes
            start = self.process_index * share
            yield [DataKey(index, epoch, position, slot) for slot, index in enumerate(batch[start : start + share], start)]
        self.epoch = epoch + 1

    def __len__(self) -> int:
        """Global batches per epoch (each process takes its share of every one)."""
        return sum(math.ceil(len(indices) / self.global_batch_size) for indices in self.by_bucket.values()) - self._skipped(self.epoch)

    def _skipped(self, epoch: int) -> int:
        if self.resume_point is not None and self.resume_point[0] == epoch:
            return self.resume_point[1]
        return 0


def noise_seed(seed: int, key: DataKey) -> int:
    """The seed of one training example's noise and timestep: a function of the run's seed and the example's
    place in the epoch only, so a resumed run or another process layout draws the very same noise."""
    digest = hashlib.blake2b(f"noise:{seed}:{key.epoch}:{key.batch}:{key.slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative int64, as torch's generators take
