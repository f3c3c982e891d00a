"""Randomness as a pure function of the seed and of where it is used.

The order of a run's examples is an endless stream of shuffled epochs (`SampleStream`), and every
example drawn at stream position p gets its own generator seeded from (seed, p) (`sample_generator`):
a resumed run sees exactly the batches and noise of an uninterrupted one, and N processes that each
take a slice of the global batch see the same samples as one process taking all of it.
"""

from __future__ import annotations

import numpy as np
import torch


class RandomDomain:
    """Keys that keep the uses of the seed apart (see `sample_generator`)."""

    EPOCH_ORDER = 0
    EXAMPLE = 1
    CACHED_CROP = 2
    CLASS_IMAGE = 3
    BUCKET_ORDER = 4
    CAPTION_DROPOUT = 5


def sample_generator(seed: int, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, *keys)``: independent streams for independent uses."""
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 31 ^ int(state[1]))


class SampleStream:
    """Stream position → dataset index, over an endless sequence of shuffled epochs."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if epoch not in self._orders:
            generator = sample_generator(self.seed, RandomDomain.EPOCH_ORDER, epoch)
            self._orders = {epoch: torch.randperm(self.length, generator=generator).tolist()}
        return self._orders[epoch][offset]
