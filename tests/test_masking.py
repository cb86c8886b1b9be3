"""iBOT masks: exact counts, block shape, the global-batch plan (counts, stratified ratios) and rank consistency."""

import random

import pytest
import torch

from dinocell.pipeline.masking import BlockMaskGenerator, IBotMaskPlanner


def planner(global_batch_size: int = 8, grid: int = 14, p: float = 0.5, ratios=(0.1, 0.5), seed: int = 0):
    return IBotMaskPlanner(
        global_batch_size=global_batch_size,
        n_global_crops=2,
        grid_size=grid,
        mask_sample_probability=p,
        mask_ratio_min_max=ratios,
        seed=seed,
    )


def test_block_masks_have_exactly_the_requested_count():
    generator = BlockMaskGenerator(14)
    rng = random.Random(0)
    for count in [0, 1, 3, 4, 20, 60, 98, 150, 196]:
        for _ in range(5):
            mask = generator(count, rng)
            assert mask.shape == (196,) and mask.dtype == torch.bool and int(mask.sum()) == count


def test_block_masks_are_blocky_not_scattered():
    generator = BlockMaskGenerator(14)
    rng = random.Random(1)
    with_masked_neighbour, total = 0, 0
    for _ in range(50):
        grid = generator(59, rng).view(14, 14)  # 30%: scattered patches have a masked 4-neighbour ~76% of the time
        padded = torch.nn.functional.pad(grid.float(), (1, 1, 1, 1))
        neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        with_masked_neighbour += int(((neighbours > 0) & grid).sum())
        total += int(grid.sum())
    assert with_masked_neighbour / total > 0.95


def test_invalid_count_is_an_error():
    with pytest.raises(ValueError, match="num_masked=197"):
        BlockMaskGenerator(14)(197, random.Random(0))


def test_plan_masks_the_exact_share_with_stratified_ratios_over_many_batches():
    gb, lo, hi = 16, 0.1, 0.5
    plan_maker = planner(global_batch_size=gb, ratios=(lo, hi))
    n_masked = int(2 * gb * 0.5)
    bins = [lo + (hi - lo) * i / n_masked for i in range(n_masked + 1)]
    chosen = torch.zeros(2 * gb)
    for g in range(200):
        ratios = plan_maker.plan(g)
        masked = sorted(r for r in ratios if r > 0)
        assert len(masked) == n_masked
        for i, r in enumerate(masked):  # the i-th smallest ratio lies in the i-th stratum
            assert bins[i] <= r <= bins[i + 1]
        chosen += torch.tensor([r > 0 for r in ratios], dtype=torch.float)
    share = chosen / 200  # every crop slot is masked about half of the time: the choice is a fair permutation
    assert share.min() > 0.3 and share.max() < 0.7


def test_rows_have_int_n_times_ratio_patches_and_follow_the_plan():
    gb = 8
    masks_for = planner(global_batch_size=gb, grid=14)
    for g in range(20):
        positions = list(range(g * gb, (g + 1) * gb))
        masks = masks_for(positions)
        assert masks.shape == (2 * gb, 196)
        expected = [int(196 * r) for r in masks_for.plan(g)]
        assert masks.sum(dim=1).tolist() == expected


def test_two_ranks_get_the_rows_of_the_one_rank_batch():
    gb, b = 8, 4
    masks_for = planner(global_batch_size=gb, seed=3)
    g = 5
    full = masks_for(list(range(g * gb, (g + 1) * gb)))
    for rank in range(2):
        positions = list(range(g * gb + rank * b, g * gb + (rank + 1) * b))
        local = planner(global_batch_size=gb, seed=3)(positions)
        for crop in range(2):  # rows are crop-major in both layouts
            first = crop * gb + rank * b
            assert torch.equal(local[crop * b : (crop + 1) * b], full[first : first + b])


def test_zero_probability_masks_nothing_and_bad_settings_are_errors():
    assert not planner(p=0.0)(list(range(8))).any()
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        planner(ratios=(0.5, 0.1))
    with pytest.raises(ValueError, match="mask_sample_probability"):
        planner(p=1.5)
    with pytest.raises(ValueError, match="span several global batches"):
        planner(global_batch_size=8)([6, 7, 8])
