"""NT-Xent, SimCLR's contrastive loss: each view must pick out the other view of its image among all views of the batch.

For a batch of B images with two views (projections z_a, z_b), every one of the 2B views is an anchor; its positive is
the other view of the same image and its negatives are the other 2B - 2 views. The loss is the cross-entropy of the
positive under a softmax over cosine similarities / temperature, averaged over anchors (Chen et al. 2020).

Under torch.distributed with more than one rank the candidates are the views of the global batch, gathered with an
autograd all-gather (gradients flow back to the rank that owns each view), and each rank averages over its own
anchors: the mean of the rank losses is the loss of the global batch, and DDP's gradient average gives its gradient.
Ranks must hold the same number of images (the trainer's batches do).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x of every rank concatenated in rank order (gradients flow back to their owners), and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x, 0
    return torch.cat(dist_fn.all_gather(x.contiguous())), dist.get_rank() * x.shape[0]


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent of two views [B, D] of the same B images (row i of z_a and row i of z_b are a positive pair).

    Rows are L2-normalised here; the result is a scalar, computed in fp32 whatever the input precision.
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape or z_a.shape[0] < 1:
        raise ValueError(
            f"z_a and z_b must be [B, D] with the same shape and B >= 1, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; SimCLR uses 0.1")
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        views = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # [2B, D]: this rank's views, all a then all b
        candidates, offset = _gather(views)  # [2G, D]: every rank's [a; b] blocks, in rank order
        logits = views @ candidates.t() / temperature  # [2B, 2G]
        b = z_a.shape[0]
        anchors = torch.arange(2 * b, device=logits.device)
        own = anchors + offset  # each view's own column (excluded: it is not a candidate)
        positive = torch.cat([anchors[b:], anchors[:b]]) + offset  # view a of image i <-> view b of image i
        logits = logits.index_put((anchors, own), torch.full((), -float("inf"), device=logits.device))
        return F.cross_entropy(logits, positive)
