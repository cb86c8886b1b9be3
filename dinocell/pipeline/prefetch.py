"""Keeping the device fed: batches copied to the device on a side stream, and a word when the loader is too slow.

`DevicePrefetcher` wraps the loader's iterator for the training loop. On CUDA each batch (pinned by the DataLoader's
pin-memory thread) is copied with non-blocking copies on a side stream: the training step never syncs with the host
(dinocell.train.step), so the loop asks for the next batch while the GPU still runs the current step, and the copy
overlaps that step on the copy engine. The step's stream then waits for that copy alone (an event), and the batch's
memory is marked as used by the step's stream, so the caching allocator does not hand it out early. Elsewhere it is the
loader's iterator followed by `.to(device)` (nothing to copy on a CPU).

`DataWaitWatch` reads the share of each logging window the loop spent waiting for the loader (metric
`data_wait_share`) and, once per CUDA run, logs which knob helps when that share is high.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch

from dinocell.pipeline.batch import SSLBatch, map_tensors

logger = logging.getLogger("dinocell")
# above this share of a logging window spent waiting for data, the loader is called the bottleneck (the target
# is 5 %; on CUDA the host-side wait overstates the GPU's idle time by up to the work still queued on the GPU)
DATA_BOUND_SHARE = 0.10


class DevicePrefetcher:
    """Iterator of batches on `device`, made from the loader's iterator `batches`."""

    def __init__(self, batches: Iterator[SSLBatch], device: torch.device) -> None:
        self.batches = batches
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> SSLBatch:
        batch = next(self.batches)
        if self.stream is None:
            return batch.to(self.device)
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):  # its allocations reuse only its own blocks, freed after the step's use
            batch = batch.to(self.device, non_blocking=True)
        consumer.wait_stream(self.stream)
        return map_tensors(batch, lambda t: _used_by(t, consumer))


def _used_by(tensor: torch.Tensor, stream: torch.cuda.Stream) -> torch.Tensor:
    tensor.record_stream(stream)
    return tensor


class DataWaitWatch:
    """`check(share)` after each metrics line: the first window that waited for data more than DATA_BOUND_SHARE (the
    first window, which holds worker start-up and compilation, excepted) gets one warning naming the knobs.

    Only where an accelerator trains (`judge`): on a CPU the loader workers and the step share the same cores, so
    waiting for data says nothing about which one to feed, and more workers would slow the step."""

    def __init__(self, num_workers: int, dataset_path: str, *, judge: bool, suggest_gpu_augmentations: bool) -> None:
        """`suggest_gpu_augmentations`: name crops.gpu_augmentations too (a CUDA run with the switch off)."""
        self.num_workers = num_workers
        self.dataset_path = dataset_path
        self.judge = judge
        self.suggest_gpu_augmentations = suggest_gpu_augmentations
        self.windows = 0
        self.warned = False

    def check(self, share: float) -> None:
        self.windows += 1
        if not self.judge or self.warned or self.windows == 1 or share <= DATA_BOUND_SHARE:
            return
        self.warned = True
        advice = [f"more loader workers (train.num_workers={self.num_workers} per process; this machine has "
                  f"{os.cpu_count() or 1} CPU cores)"]
        if self.dataset_path.startswith("JUMP"):
            advice.append("a larger crops_per_field in train.dataset_path (each downloaded and normalised field then "
                          "feeds more crop sets)")
        if self.suggest_gpu_augmentations:
            advice.append("crops.gpu_augmentations=true (the photometric ops move from the workers to the GPU)")
        logger.warning(
            "the data loader is the bottleneck: training waited for data %.0f%% of the last logging window "
            "(data_wait_share; above %.0f%% the step idles while the loader catches up). What helps: %s. This is "
            "said once per run.", 100 * share, 100 * DATA_BOUND_SHARE, "; ".join(advice),
        )
