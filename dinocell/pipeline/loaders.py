"""Builders that turn the config into the SSL data stream: transform, iBOT masks, sampler, workers, collate.

The DataLoader's sampler yields `(dataset_index, position)`; `PositionedDataset` fetches the sample and applies
`transform(sample, position)`, and the collate function (which runs in the workers) adds the iBOT masks. Nothing
random depends on the worker or rank, so the stream is identical for any num_workers and world size.

With gradient accumulation (k micro-batches per optimiser step) the sampler's global batch is the step's
(batch x processes x k) and each process's share is cut into k micro-batches: the images, crops and iBOT masks of a
step are those of one k-times larger batch.
"""

from __future__ import annotations

import functools
import random
import signal
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinocell.config.schema import GLOBAL_CROP_GROUPS, SSLConfig
from dinocell.data.dataset import Sample, SampleDataset
from dinocell.pipeline.collate import collate_ssl_batch
from dinocell.pipeline.masking import IBotMaskPlanner
from dinocell.pipeline.samplers import InfiniteSampler, SeedStream, derive_seed
from dinocell.pipeline.transforms import EvalTransform, MultiCropTransform

SSLTransform = Callable[[Sample, int], dict]


class PositionedDataset(Dataset):
    """Wraps a dataset: item `(index, position)` -> `(transform(dataset[index], position), position)`."""

    def __init__(self, dataset: SampleDataset, transform: SSLTransform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[dict, int]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list[tuple[dict, int]]:
        """One batch at once, so batch-concurrent datasets (S3: many requests in flight) fetch it together."""
        samples = self.dataset.__getitems__([index for index, _ in items])
        positions = [position for _, position in items]
        return [(self.transform(s, p), p) for s, p in zip(samples, positions, strict=True)]


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Seed global RNGs per (seed, rank, worker) for datasets with internal randomness; crops never use them.

    Also ignore SIGTERM and SIGUSR2 (Slurm's requeue notice under submitit): a scheduler signals every process of a
    task, and a worker killed under the training process would abort the checkpoint it writes before stopping
    (dinocell.train.signals), or a worker would act on a handler it inherited; the training process ends its workers
    itself, and they exit when it dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    worker_seed = derive_seed(seed, SeedStream.WORKER, rank, worker_id)
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)


def build_ssl_loader(
    dataset: SampleDataset,
    transform: SSLTransform,
    mask_planner: IBotMaskPlanner,
    *,
    batch_size_per_rank: int,
    local_crops_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_iter: int = 0,
    grad_accum_steps: int = 1,
    shuffle: bool = True,
    num_workers: int = 0,
    persistent_workers: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """Endless loader of collated SSL micro-batches of `batch_size_per_rank` for one rank, starting at global batch
    `start_iter`; `grad_accum_steps` consecutive micro-batches make one global batch (one optimiser step).

    The global batch is `batch_size_per_rank * world_size * grad_accum_steps` and must match
    `mask_planner.global_batch_size`. `shuffle=False` visits the dataset in order (position = index in the first pass).
    """
    global_batch_size = batch_size_per_rank * world_size * grad_accum_steps
    if mask_planner.global_batch_size != global_batch_size:
        raise ValueError(
            f"mask planner global batch {mask_planner.global_batch_size} != batch_size_per_rank {batch_size_per_rank} "
            f"x world_size {world_size} x grad_accum_steps {grad_accum_steps} = {global_batch_size}; build the "
            "planner with that global_batch_size"
        )
    sampler = InfiniteSampler(
        len(dataset),
        global_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        start_iter=start_iter,
        shuffle=shuffle,
        block_size=dataset.sample_block_size,
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
        persistent_workers=workers and persistent_workers,
        prefetch_factor=prefetch_factor if workers else None,
        worker_init_fn=functools.partial(_seed_worker, seed, rank) if workers else None,
    )


def build_ssl_transform(cfg: SSLConfig) -> MultiCropTransform:
    """The training transform `(sample, position) -> crops` of the config."""
    return MultiCropTransform(cfg.crops, in_chans=cfg.student.in_chans, seed=cfg.train.seed)


def build_eval_transform(cfg: SSLConfig) -> EvalTransform:
    """Deterministic k-NN/eval transform: global_crops_size, all channels mapped to in_chans, same normalisation."""
    crops = cfg.crops
    return EvalTransform(crops.global_crops_size, cfg.student.in_chans, crops.channel_mean, crops.channel_std)


def build_mask_planner(cfg: SSLConfig, global_batch_size: int) -> IBotMaskPlanner:
    """iBOT mask plan for the global crops of crops.global_crops_size on a student.patch_size grid; SimCLR uses no
    masks, so its batches carry an empty plan ([2B, 0] masks)."""
    dino = cfg.method == "dino"
    return IBotMaskPlanner(
        global_batch_size=global_batch_size,
        n_global_crops=len(GLOBAL_CROP_GROUPS),
        grid_size=cfg.crops.global_crops_size // cfg.student.patch_size if dino else 0,
        mask_sample_probability=cfg.ibot.mask_sample_probability if dino else 0.0,
        mask_ratio_min_max=cfg.ibot.mask_ratio_min_max,
        seed=cfg.train.seed,
    )


def build_ssl_loader_from_config(
    cfg: SSLConfig, dataset: SampleDataset, *, rank: int, world_size: int, start_iter: int, pin_memory: bool = False
) -> DataLoader:
    """The whole training stream from the config: what the trainer calls (train.grad_accum_steps micro-batches of
    train.batch_size_per_gpu per step)."""
    batch, accum = cfg.train.batch_size_per_gpu, cfg.train.grad_accum_steps
    return build_ssl_loader(
        dataset,
        build_ssl_transform(cfg),
        build_mask_planner(cfg, batch * world_size * accum),
        batch_size_per_rank=batch,
        local_crops_size=cfg.crops.local_crops_size,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        start_iter=start_iter,
        grad_accum_steps=accum,
        num_workers=cfg.train.num_workers,
        pin_memory=pin_memory,
    )


def build_validation_loader(
    cfg: SSLConfig, dataset: SampleDataset, *, rank: int, world_size: int, pin_memory: bool = False
) -> DataLoader:
    """The validation stream: the dataset in order, with the training crops and masks of each position (a function
    of train.seed and the sample's index only, so every validation sees the same views); batches as in training
    without accumulation. Iterate it anew for each validation and read len(dataset) // (batch x processes) batches."""
    batch = cfg.train.batch_size_per_gpu
    return build_ssl_loader(
        dataset,
        build_ssl_transform(cfg),
        build_mask_planner(cfg, batch * world_size),
        batch_size_per_rank=batch,
        local_crops_size=cfg.crops.local_crops_size,
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed,
        shuffle=False,
        num_workers=cfg.train.num_workers,
        persistent_workers=False,  # validation is rare: its workers exit between validations
        pin_memory=pin_memory,
    )
