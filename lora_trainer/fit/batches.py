"""Batches that never mix buckets, shuffled within and across buckets each epoch, reproducibly from the seed.

`BucketBatches`, the data loader's batch sampler, yields lists of `(item index, epoch)`, so the dataset can
draw each item's random choices (caption shuffle, flip) from a generator seeded by seed, epoch and item:
the same run twice sees the same data, whatever the number of data-loader workers.

It also splits the epoch's batches between processes itself (multi-GPU): Accelerate's sharding pads
uneven batches with samples from other batches, which would mix bucket sizes in one tensor.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from lora_trainer.data.buckets import Size


class BucketBatches(Sampler[list[tuple[int, int]]]):
    def __init__(self, buckets: Sequence[Size], batch_size: int, seed: int, num_processes: int = 1, process_index: int = 0):
        self.by_bucket: dict[Size, list[int]] = defaultdict(list)
        for index, bucket in enumerate(buckets):
            self.by_bucket[bucket].append(index)
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of an epoch, for every process, in training order."""
        rng = random.Random(f"buckets:{self.seed}:{epoch}")
        batches = []
        for bucket in sorted(self.by_bucket):
            indices = list(self.by_bucket[bucket])
            rng.shuffle(indices)
            batches += [indices[start : start + self.batch_size] for start in range(0, len(indices), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        batches = self.epoch_batches(epoch)
        # Every process must take the same number of steps: the last round is filled with whole early batches.
        shortfall = -len(batches) % self.num_processes
        batches += [batches[index % len(batches)] for index in range(shortfall)]
        for batch in batches[self.process_index :: self.num_processes]:
            yield [(index, epoch) for index in batch]
        self.epoch = epoch + 1

    def __len__(self) -> int:
        total = sum(math.ceil(len(indices) / self.batch_size) for indices in self.by_bucket.values())
        return math.ceil(total / self.num_processes)
