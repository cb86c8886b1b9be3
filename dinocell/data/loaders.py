"""Builders that turn the config into the SSL data stream: transform, iBOT masks, sampler, workers, collate.

The DataLoader's sampler yields `(dataset_index, position)`; `PositionedDataset` fetches the sample and applies
`transform(sample, position)`, and the collate function (which runs in the workers) adds the iBOT masks. Nothing
random depends on the worker or rank, so the stream is identical for any num_workers and world size.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinocell.data.collate import collate_ssl_batch
from dinocell.data.masking import IBotMaskPlanner
from dinocell.data.samplers import InfiniteSampler, SeedStream, derive_seed
from dinocell.data.transforms import CropSettings, EvalTransform, MultiCropTransform

SSLTransform = Callable[[dict, int], dict]


class PositionedDataset(Dataset):
    """Wraps a map-style dataset: item `(index, position)` -> `transform(dataset[index], position)`."""

    def __init__(self, dataset: Dataset, transform: SSLTransform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, position = item
        return self.transform(self.dataset[index], position)

    def __getitems__(self, items: list[tuple[int, int]]) -> list[dict]:
        """One batch at once; a dataset with its own `__getitems__` (e.g. S3, many requests in flight) gets the list."""
        indices = [index for index, _ in items]
        fetch_batch = getattr(self.dataset, "__getitems__", None)
        samples = fetch_batch(indices) if fetch_batch is not None else [self.dataset[i] for i in indices]
        return [self.transform(sample, position) for sample, (_, position) in zip(samples, items, strict=True)]


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Seed global RNGs per (seed, rank, worker) for datasets with internal randomness; crops never use them."""
    worker_seed = derive_seed(seed, SeedStream.WORKER, rank, worker_id)
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)


def build_ssl_loader(
    dataset: Dataset,
    transform: SSLTransform,
    mask_planner: IBotMaskPlanner,
    *,
    batch_size_per_rank: int,
    local_crops_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_iter: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """Endless loader of collated SSL batches for one rank, starting at global batch `start_iter`.

    The global batch is `batch_size_per_rank * world_size` and must match `mask_planner.global_batch_size`.
    """
    global_batch_size = batch_size_per_rank * world_size
    if mask_planner.global_batch_size != global_batch_size:
        raise ValueError(
            f"mask planner global batch {mask_planner.global_batch_size} != batch_size_per_rank {batch_size_per_rank} "
            f"x world_size {world_size} = {global_batch_size}; build the planner with that global_batch_size"
        )
    # Datasets whose consecutive indices share one read (JUMP crops_per_field) say so with `sample_block_size`.
    block_size = int(getattr(dataset, "sample_block_size", 1))
    sampler = InfiniteSampler(
        len(dataset),
        global_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        start_iter=start_iter,
        block_size=block_size,
    )
    workers = num_workers > 0
    return DataLoader(
        PositionedDataset(dataset, transform),
        batch_size=batch_size_per_rank,
        sampler=sampler,
        collate_fn=functools.partial(collate_ssl_batch, mask_planner=mask_planner, local_crops_size=local_crops_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        worker_init_fn=functools.partial(_seed_worker, seed, rank) if workers else None,
    )


def _pair(values: Sequence[Any]) -> tuple[float, float]:
    low, high = (float(v) for v in values)
    return low, high


def _per_group(node: Any, cast: Callable[[Any], Any]) -> dict[str, Any]:
    """A {global1, global2, local} config mapping as a plain dict (validated by CropSettings)."""
    return {str(group): cast(value) for group, value in node.items()}


def build_crop_settings(cfg: Any) -> CropSettings:
    """cfg.crops + student.in_chans + train.seed -> CropSettings (validated there)."""
    crops = cfg.crops
    mean = None if crops.channel_mean is None else tuple(float(v) for v in crops.channel_mean)
    std = None if crops.channel_std is None else tuple(float(v) for v in crops.channel_std)
    return CropSettings(
        in_chans=int(cfg.student.in_chans),
        seed=int(cfg.train.seed),
        global_crops_size=int(crops.global_crops_size),
        global_crops_scale=_pair(crops.global_crops_scale),
        local_crops_number=int(crops.local_crops_number),
        local_crops_size=int(crops.local_crops_size),
        local_crops_scale=_pair(crops.local_crops_scale),
        horizontal_flips=bool(crops.horizontal_flips),
        vertical_flips=bool(crops.vertical_flips),
        rotate90=bool(crops.rotate90),
        channel_views=_per_group(crops.channel_views, str),
        local_masked_crops_fraction=float(crops.local_masked_crops_fraction),
        photometric_aug=bool(crops.photometric_aug),
        intensity_aug_probability=float(crops.intensity_aug_probability),
        brightness_range=_pair(crops.brightness_range),
        contrast_range=_pair(crops.contrast_range),
        gamma_range=_pair(crops.gamma_range),
        blur_probability=_per_group(crops.blur_probability, float),
        blur_sigma=_pair(crops.blur_sigma),
        noise_probability=_per_group(crops.noise_probability, float),
        noise_std=_pair(crops.noise_std),
        solarization_probability=_per_group(crops.solarization_probability, float),
        solarization_threshold=float(crops.solarization_threshold),
        rgb_color_aug=bool(crops.rgb_color_aug),
        channel_mean=mean,
        channel_std=std,
    )


def build_ssl_transform(cfg: Any) -> MultiCropTransform:
    """The training transform `(sample, position) -> crops` of the config."""
    return MultiCropTransform(build_crop_settings(cfg))


def build_eval_transform(cfg: Any) -> EvalTransform:
    """Deterministic k-NN/eval transform: global_crops_size, all channels mapped to in_chans, same normalisation."""
    settings = build_crop_settings(cfg)
    return EvalTransform(settings.global_crops_size, settings.in_chans, settings.channel_mean, settings.channel_std)


def build_mask_planner(cfg: Any, global_batch_size: int) -> IBotMaskPlanner:
    """iBOT mask plan for global crops of crops.global_crops_size on a student.patch_size grid."""
    size, patch = int(cfg.crops.global_crops_size), int(cfg.student.patch_size)
    if size % patch:
        raise ValueError(
            f"crops.global_crops_size={size} is not divisible by student.patch_size={patch}; "
            f"closest valid size: {max(patch, round(size / patch) * patch)}"
        )
    return IBotMaskPlanner(
        global_batch_size=global_batch_size,
        grid_size=size // patch,
        mask_sample_probability=float(cfg.ibot.mask_sample_probability),
        mask_ratio_min_max=_pair(cfg.ibot.mask_ratio_min_max),
        seed=int(cfg.train.seed),
    )


def build_ssl_loader_from_config(
    cfg: Any, dataset: Dataset, *, rank: int, world_size: int, start_iter: int, pin_memory: bool = False
) -> DataLoader:
    """The whole training stream from the config: what the trainer calls."""
    batch = int(cfg.train.batch_size_per_gpu)
    return build_ssl_loader(
        dataset,
        build_ssl_transform(cfg),
        build_mask_planner(cfg, batch * world_size),
        batch_size_per_rank=batch,
        local_crops_size=int(cfg.crops.local_crops_size),
        rank=rank,
        world_size=world_size,
        seed=int(cfg.train.seed),
        start_iter=start_iter,
        num_workers=int(cfg.train.num_workers),
        pin_memory=pin_memory,
    )

