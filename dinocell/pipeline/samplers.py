"""Infinite, seeded, rank-sharded sampling of the global sample stream, and the seed mixing every random choice uses.

The sampler hands out `(dataset_index, position)` pairs. `position` is the sample's place in the GLOBAL stream, so
every random choice made for it (crops, flips, views, iBOT masks) can be derived from `(train.seed, position)` alone:
the batches a run sees then do not depend on the number of workers, the number of ranks, or on being resumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum

import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


class SeedStream(IntEnum):
    """Separate random streams derived from the same (seed, ...) so that, e.g., crops and masks never correlate."""

    SAMPLER_PASS = 1
    CROPS = 2
    MASK_PLAN = 3
    MASK_BLOCKS = 4
    WORKER = 5


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*values: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 chain); unlike `seed + position`, nearby tuples do not collide."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ (int(value) & _MASK64))
    return state >> 1


class InfiniteSampler(Sampler[tuple[int, int]]):
    """Endless stream of `(dataset_index, position)` for one rank.

    Global batch g holds positions [g*GB, (g+1)*GB); rank r gets the contiguous slice [g*GB + r*b, g*GB + (r+1)*b)
    with b = GB / world_size. Position p visits dataset index perm_k[p mod N] where k = p // N is the pass over the
    dataset and perm_k a permutation seeded by (seed, k); only the current pass's permutation is held in memory.
    Starting at `start_iter` skips exactly `start_iter` global batches, so a resumed run sees the same batches.

    With `block_size` k > 1 the permutation moves blocks of k consecutive indices and keeps each block in order:
    datasets whose k neighbouring indices share one expensive read (JUMP `crops_per_field`) then get the k samples of
    a field in one rank's batch (k must divide the per-rank batch), so the field is downloaded once for all of them.
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_iter: int = 0,
        shuffle: bool = True,
        block_size: int = 1,
    ) -> None:
        if dataset_size < 1:
            raise ValueError(f"dataset_size={dataset_size}: the dataset is empty; expected at least 1 sample")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank={rank}, world_size={world_size}: expected world_size >= 1 and 0 <= rank < world_size"
            )
        if global_batch_size < world_size or global_batch_size % world_size:
            closest = max(world_size, round(global_batch_size / world_size) * world_size)
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a positive multiple of world_size={world_size}; "
                f"closest valid value: {closest}"
            )
        b = global_batch_size // world_size
        if block_size < 1 or dataset_size % block_size or b % block_size:
            raise ValueError(
                f"block_size={block_size} must be >= 1 and divide both the dataset size ({dataset_size}) and the "
                f"per-rank batch ({b}); e.g. choose crops_per_field among the divisors of train.batch_size_per_gpu"
            )
        if start_iter < 0:
            raise ValueError(f"start_iter={start_iter}: expected an iteration >= 0")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.batch_size_per_rank = global_batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_iter = start_iter
        self.shuffle = shuffle
        self.block_size = block_size

    def permutation(self, dataset_pass: int) -> torch.Tensor:
        """Dataset order of pass `dataset_pass` (identity when shuffle is off)."""
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, SeedStream.SAMPLER_PASS, dataset_pass))
        k = self.block_size
        blocks = torch.randperm(self.dataset_size // k, generator=generator)
        return blocks if k == 1 else (blocks.unsqueeze(1) * k + torch.arange(k)).flatten()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        b = self.batch_size_per_rank
        current_pass, order = -1, torch.empty(0, dtype=torch.long)
        iteration = self.start_iter
        while True:
            first = iteration * self.global_batch_size + self.rank * b
            for position in range(first, first + b):
                dataset_pass, offset = divmod(position, self.dataset_size)
                if dataset_pass != current_pass:
                    current_pass, order = dataset_pass, self.permutation(dataset_pass)
                yield int(order[offset]), position
            iteration += 1
