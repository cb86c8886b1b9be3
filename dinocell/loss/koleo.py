"""KoLeo regulariser: spreads the student's features by penalising a small distance to the nearest neighbour.

Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2018), used on the pre-head global cls tokens in DINOv2/v3.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# The reference measures distances with nn.PairwiseDistance(eps=1e-8), independent of the loss's own eps.
_PAIRWISE_EPS = 1e-8
_warned_small_batch = False


def koleo_loss(
    x: torch.Tensor,
    eps: float = 1e-8,
    *,
    candidates: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Mean over the rows of x [B, D] of -log(distance to the nearest other row + eps), on L2-normalised rows.

    Neighbours are searched in `candidates` [G, D] (default: x itself). For a distributed KoLeo pass the global batch
    gathered over ranks (with an autograd all-gather if neighbours should receive gradients) and `offset`, the index
    of x[0] in it; row i of x is then excluded as candidates[offset + i]. Fewer than 2 candidates leave no neighbour:
    the result is a zero attached to the graph, with a warning (once), never NaN.
    """
    global _warned_small_batch
    pool = x if candidates is None else candidates
    if x.ndim != 2 or pool.ndim != 2 or pool.shape[1] != x.shape[1]:
        raise ValueError(
            f"x must be [B, D] and candidates [G, D] with the same D, got {tuple(x.shape)} and {tuple(pool.shape)}"
        )
    if not 0 <= offset <= pool.shape[0] - x.shape[0]:
        raise ValueError(f"offset {offset} places x ({x.shape[0]} rows) outside candidates ({pool.shape[0]} rows)")
    if pool.shape[0] < 2:
        if not _warned_small_batch:
            warnings.warn(
                f"KoLeo needs at least 2 samples to find a nearest neighbour, got {pool.shape[0]}: its loss is 0 for "
                "such batches (use a batch of 2 or more)",
                stacklevel=2,
            )
            _warned_small_batch = True
        return (x * 0.0).sum()
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        pool = x if candidates is None else F.normalize(pool.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            similarity = x @ pool.t()  # highest cosine similarity = nearest neighbour on the unit sphere
            own = torch.arange(x.shape[0], device=x.device)
            similarity[own, own + offset] = -float("inf")
            nearest = similarity.argmax(dim=1)
        distances = F.pairwise_distance(x, pool[nearest], p=2, eps=_PAIRWISE_EPS)
        return -torch.log(distances + eps).mean()
