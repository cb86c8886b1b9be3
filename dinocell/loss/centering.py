"""Teacher targets: turn teacher logits into the probabilities the student is trained to match.

Two methods, both pure functions so that the trainer owns all state (the EMA center lives in its checkpoint):
- Sinkhorn-Knopp (DINOv3 default): a few alternating normalisations that make every prototype receive the same total
  mass over the batch, which prevents collapse onto a few prototypes without any running state.
- EMA centering + softmax (DINO/DINOv2 alternative): subtract a running mean of the teacher logits, then sharpen.

Under torch.distributed with more than one rank the batch statistics are summed over all ranks, so the targets of a
sample do not depend on how the global batch is split over processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world_size() -> int:
    """Ranks whose batches make up the global batch (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks; a no-op in a single process."""
    if _world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher probabilities [N, K] from logits [N, K] by Sinkhorn-Knopp at temperature `temp`, in fp32.

    Each iteration first gives every prototype (column of the input) total mass 1/K over the global batch, then
    every sample (row) mass 1/B_global; the result is rescaled so each row sums to 1. B_global is the number of rows
    summed over ranks, so ranks may hold different row counts (iBOT: masked patches per rank).
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be [N, K], got shape {tuple(teacher_logits.shape)}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}; DINOv3 uses 3")
    q = torch.exp(teacher_logits.float() / temp).t()  # [K, N]: rows = prototypes, columns = samples
    n_prototypes = q.shape[0]
    # torch.full, not torch.tensor: filling on the device is one kernel; copying a host value would wait for the GPU
    n_samples = _all_reduce_sum(torch.full((), float(q.shape[1]), device=q.device))
    q /= _all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


@torch.no_grad()
def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Teacher probabilities softmax((logits - center) / temp) over the last dimension, in fp32."""
    return F.softmax((teacher_logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def logit_sum(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum [1, K], row count []) of the logits [N, K] over the global batch (summed over ranks): the statistics an EMA
    center needs. They add up, so the sums of several micro-batches are those of their union."""
    flat = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
    total = _all_reduce_sum(flat.sum(dim=0, keepdim=True))
    count = _all_reduce_sum(torch.full((), float(flat.shape[0]), device=flat.device))
    return total, count


@torch.no_grad()
def update_center(
    center: torch.Tensor, total: torch.Tensor, count: torch.Tensor, momentum: float = 0.9
) -> torch.Tensor:
    """New EMA center [1, K]: momentum * center + (1 - momentum) * total / count, the batch mean of the logits from
    `logit_sum`. Use order (as in DINOv2): targets of iteration i use the center before iteration i's update."""
    updated = center * momentum + (total / count.clamp(min=1)) * (1 - momentum)
    return torch.where(count > 0, updated, center)  # no rows anywhere (e.g. no masked patch): keep the center
