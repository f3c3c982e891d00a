"""Aspect-ratio buckets, as kohya sd-scripts and SimpleTuner users know them.

Instead of cropping every image to a square, the dataset trainer sorts images into buckets of
about the same area (``resolution``² pixels) and different shapes: every side a multiple of
``step`` between ``min_side`` and ``max_side``. Each image goes to the bucket whose aspect ratio
is nearest its own (in log ratio, so 2:1 and 1:2 are equally far from 1:1), is scaled to cover it
and cropped to it. A micro-batch is drawn from one bucket, so its latents stack.

`BucketStream` keeps the property of `difftune.streams.SampleStream` that training relies on:
the example at stream position p is a pure function of (seed, p), so a resumed run draws exactly
what an uninterrupted one would. Each epoch shuffles every bucket, fills its last block by
repeating the bucket's first examples (every block holds ``block`` examples of one bucket),
shuffles the blocks, and lays them end to end.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import torch

from ..errors import DifftuneError
from ..streams import RandomDomain, sample_generator


@dataclasses.dataclass(frozen=True)
class BucketSettings:
    """The bucket grid: area ``resolution``², sides multiples of ``step`` in [min_side, max_side]."""

    resolution: int
    min_side: int
    max_side: int
    step: int

    def check(self, size_multiple: int) -> None:
        """Refuse a grid the model cannot take or that holds no bucket, naming the flag."""
        if self.step < 1 or self.step % size_multiple:
            raise DifftuneError(f"--bucket_step must be a positive multiple of {size_multiple} for this "
                                f"model (the VAE factor times the latent patch), got {self.step}")
        if not 0 < self.min_side <= self.resolution <= self.max_side:
            raise DifftuneError("aspect buckets need --bucket_min_side <= --resolution <= "
                                f"--bucket_max_side, got {self.min_side}, {self.resolution}, "
                                f"{self.max_side}")
        if not bucket_sizes(self):
            raise DifftuneError(f"no bucket fits --bucket_min_side {self.min_side}, --bucket_max_side "
                                f"{self.max_side} and --bucket_step {self.step} at --resolution "
                                f"{self.resolution}")


def bucket_sizes(settings: BucketSettings) -> list[tuple[int, int]]:
    """Every bucket as (height, width), widest first: for each width on the grid, the tallest
    height on the grid whose area stays within resolution², and the same shape upright."""
    area = settings.resolution ** 2
    first = -(-settings.min_side // settings.step) * settings.step
    sizes = set()
    for width in range(first, settings.max_side + 1, settings.step):
        height = min(settings.max_side, area // width // settings.step * settings.step)
        if height >= settings.min_side:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes, key=lambda size: size[1] / size[0], reverse=True)


def nearest_bucket(width: int, height: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (height, width) whose aspect ratio is nearest ``width / height`` in log ratio."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda size: abs(math.log(size[1] / size[0]) - ratio))


def describe_counts(buckets: Sequence[tuple[int, int]]) -> str:
    """One line for the log: ``512x512: 120, 448x576: 31, ...`` (width x height, most images first)."""
    counts = Counter(buckets).most_common()
    return ", ".join(f"{width}x{height}: {count}" for (height, width), count in counts)


class BucketStream:
    """Stream position → dataset index, every aligned block of ``block`` positions in one bucket
    (see the module docstring). ``length`` is the number of positions per epoch."""

    def __init__(self, buckets: Sequence[tuple[int, int]], block: int, seed: int):
        self.block = block
        self.seed = seed
        members: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            members.setdefault(bucket, []).append(index)
        self._members = [members[key] for key in sorted(members)]
        self.length = sum(-(-len(m) // block) * block for m in self._members)
        self._orders: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        generator = sample_generator(self.seed, RandomDomain.BUCKET_ORDER, epoch)
        blocks = []
        for members in self._members:
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            filled = -(-len(shuffled) // self.block) * self.block
            padded = [shuffled[i % len(shuffled)] for i in range(filled)]
            blocks += [padded[start:start + self.block] for start in range(0, len(padded), self.block)]
        order = torch.randperm(len(blocks), generator=generator).tolist()
        return [index for b in order for index in blocks[b]]

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if epoch not in self._orders:
            self._orders = {epoch: self.epoch_order(epoch)}
        return self._orders[epoch][offset]
