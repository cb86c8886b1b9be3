"""iBOT masks: BEiT-style block masks on the patch grid, planned over the GLOBAL batch.

Reference semantics (DINOv2/v3 collate + MaskingGenerator): of the S*GB global crops of a global batch (S = 2 global
crops per image), int(S*GB * mask_sample_probability) are masked; the i-th masked crop gets a ratio drawn uniformly from
[r_i, r_{i+1}] of linspace(min, max, n_masked + 1), and int(N * ratio) patches are masked with rectangular blocks
(area >= min_num_patches, aspect ratio in [0.3, 1/0.3], each block at most max_num_patches), topped up at random
to the exact count. Which crops are masked is a permutation seeded by (seed, global batch); every rank computes the
same plan and keeps the rows of its own positions, so masks do not depend on the world size.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from dinocell.pipeline.samplers import SeedStream, derive_seed


class BlockMaskGenerator:
    """Exact-count block masks on a `grid_size` x `grid_size` patch grid."""

    def __init__(
        self,
        grid_size: int,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.grid_size = grid_size
        self.num_patches = grid_size * grid_size
        self.min_num_patches = min_num_patches
        # Reference: a single block covers at most half of the grid.
        self.max_num_patches = max_num_patches if max_num_patches is not None else self.num_patches // 2
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect if max_aspect is not None else 1 / min_aspect))

    def __call__(self, num_masked: int, rng: random.Random) -> torch.Tensor:
        """bool [grid_size**2] with exactly `num_masked` True entries."""
        if not 0 <= num_masked <= self.num_patches:
            raise ValueError(f"num_masked={num_masked}: expected 0 <= num_masked <= {self.num_patches} patches")
        mask = torch.zeros(self.grid_size, self.grid_size, dtype=torch.bool)
        count = 0
        while count < num_masked:
            added = self._add_block(mask, min(num_masked - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        flat = mask.flatten()
        if count < num_masked:  # blocks could not fit: top up with random single patches
            free = torch.nonzero(~flat).flatten().tolist()
            flat[rng.sample(free, num_masked - count)] = True
        return flat

    def _add_block(self, mask: torch.Tensor, max_new: int, rng: random.Random) -> int:
        """Try up to 10 random rectangles; place the first that adds between 1 and max_new new patches."""
        side = self.grid_size
        for _ in range(10):
            if max_new < self.min_num_patches:
                return 0
            area = rng.uniform(self.min_num_patches, max_new)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < side and 0 < w < side:
                top, left = rng.randint(0, side - h), rng.randint(0, side - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_new:
                    block.fill_(True)
                    return new
        return 0


class IBotMaskPlanner:
    """Masks for the global crops of a rank's slice of a global batch, identical to the 1-rank plan."""

    def __init__(
        self,
        *,
        global_batch_size: int,
        n_global_crops: int,
        grid_size: int,
        mask_sample_probability: float,
        mask_ratio_min_max: Sequence[float],
        seed: int,
    ) -> None:
        low, high = (float(v) for v in mask_ratio_min_max)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"ibot.mask_ratio_min_max={[low, high]}: expected 0 <= min <= max <= 1, e.g. [0.1, 0.5]")
        if not 0.0 <= mask_sample_probability <= 1.0:
            raise ValueError(f"ibot.mask_sample_probability={mask_sample_probability}: expected a value in [0, 1]")
        self.global_batch_size = global_batch_size
        self.n_global_crops = n_global_crops
        self.mask_sample_probability = mask_sample_probability
        self.ratio_range = (low, high)
        self.seed = seed
        self.generator = BlockMaskGenerator(grid_size)
        self.num_patches = grid_size * grid_size

    def plan(self, global_batch: int) -> list[float]:
        """Mask ratio of each of the S*GB global crops (crop-major: index j*GB + k), 0.0 = not masked."""
        n_crops = self.n_global_crops * self.global_batch_size
        n_masked = int(n_crops * self.mask_sample_probability)
        rng = random.Random(derive_seed(self.seed, SeedStream.MASK_PLAN, global_batch))
        order = rng.sample(range(n_crops), n_crops)
        low, high = self.ratio_range
        bounds = [low + (high - low) * i / n_masked for i in range(n_masked + 1)] if n_masked else []
        ratios = [0.0] * n_crops
        for i in range(n_masked):
            ratios[order[i]] = rng.uniform(bounds[i], bounds[i + 1])
        return ratios

    def __call__(self, positions: Sequence[int]) -> torch.Tensor:
        """bool [S*b, N] for the b positions of one global batch, rows ordered crop-major like the collated crops."""
        global_batch = positions[0] // self.global_batch_size
        if any(p // self.global_batch_size != global_batch for p in positions):
            raise ValueError(
                f"positions {list(positions)} span several global batches of size {self.global_batch_size}"
            )
        ratios = self.plan(global_batch)
        rows = []
        for crop in range(self.n_global_crops):
            for position in positions:
                ratio = ratios[crop * self.global_batch_size + position % self.global_batch_size]
                rng = random.Random(derive_seed(self.seed, SeedStream.MASK_BLOCKS, position, crop))
                rows.append(self.generator(int(self.num_patches * ratio), rng))
        return torch.stack(rows)
