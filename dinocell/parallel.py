"""How the model is spread over the processes (`train.parallelism`): the one place that wraps or shards it.

- `ddp`: every process holds the whole model; DistributedDataParallel averages the student's gradients in buckets
  during backward. Simple and fastest while the model, its gradients, the AdamW moments and the teacher fit one GPU.
- `fsdp`: FSDP2 (`fully_shard`) splits every parameter along its first dimension over the processes: each block of
  the backbone, each head and each backbone's remaining weights (embeddings, tokens, norm) is a unit whose weights are
  gathered just before it runs and freed right after, and the model itself is the root. Student and teacher are
  sharded alike, so the teacher's EMA update pairs local shards and needs no communication; gradients are
  reduce-scattered, so each process updates only its shard. On CUDA the gathered weights are cast to the autocast
  dtype (`compute_precision.autocast_dtype`), while the sharded weights, the gradient reduction and AdamW stay fp32.

Under `fsdp` only rank 0 builds (and initialises) the model in CPU memory; the other ranks receive their shards from
it. A single process has nothing to shard: it trains the plain model (its checkpoints are still written in the
sharded layout, see dinocell.train.checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from dinocell import distributed
from dinocell.config.schema import AUTOCAST_DTYPES

logger = logging.getLogger("dinocell")


def mixed_precision(device: torch.device, autocast_dtype: str) -> MixedPrecisionPolicy:
    """FSDP's casts: on CUDA, weights gathered in the autocast dtype (`compute_precision.autocast_dtype`, so the
    all-gathers move half the bytes) and gradients reduced in fp32 (as DDP reduces the fp32 gradients autocast leaves:
    sharding does not change the precision of the update). The CPU path stays fp32 throughout."""
    dtype = getattr(torch, AUTOCAST_DTYPES[autocast_dtype])
    if device.type != "cuda" or dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, units: Iterable[nn.Module], policy: MixedPrecisionPolicy) -> None:
    """Apply FSDP2 in place: `fully_shard` on each unit (innermost first), then on `model` as the root. Weights on the
    CPU are moved to the process's device as shards; weights on the meta device stay there, unallocated.

    Must run before the optimiser is built (sharding replaces the parameters). Units called through
    `forward_features` instead of `forward` (backbones) get that method registered, so that their weights are gathered
    for it."""
    for unit in units:
        fully_shard(unit, mp_policy=policy)
        if hasattr(unit, "forward_features"):
            register_fsdp_forward_method(unit, "forward_features")
    fully_shard(model)  # the root holds no weights of its own, so it casts nothing (the batch keeps its dtypes)


def build_sharded(build: Callable[[], nn.Module], units: Callable[[nn.Module], Iterable[nn.Module]],
                  policy: MixedPrecisionPolicy, device: torch.device) -> nn.Module:
    """`build()` sharded over the processes, with rank 0's initialisation (so the same as DDP's).

    Only rank 0 builds the model in CPU memory; the other ranks build it on the meta device (no memory, no
    initialisation, no weights file read) and receive their shards of rank 0's weights by broadcast. A node thus needs
    the CPU memory of one model, not one per process. With one process there is nothing to shard: the plain model."""
    if not distributed.is_enabled():
        logger.info("train.parallelism=fsdp with one process: nothing to shard, the model is trained whole")
        return build().to(device)
    is_main = distributed.get_rank() == 0
    with contextlib.nullcontext() if is_main else torch.device("meta"):
        model = build()
    weights = model.state_dict() if is_main else {}
    shard_model(model, units(model), policy)
    if not is_main:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    return model


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule) or any(isinstance(p, DTensor) for p in module.parameters())


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The module the training step calls: the sharded model itself, DistributedDataParallel around `model` when
    several processes train it whole, or `model` in a single process.

    DDP averages the gradients of the parameters that require them (the student's) during backward, bucketed and
    overlapped with computation; buffers are not broadcast (they are constants, or updated identically on every rank).
    """
    if is_sharded(model) or not distributed.is_enabled():
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients to a total norm of `max_norm`; returns the norm before clipping as a plain tensor, the same on
    every rank. With sharded gradients the norm is that of the whole gradient (the shards' squares summed over ranks).
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s weights whole, as a detached copy on CPU, on rank 0 ({} on the other ranks). Sharded weights are
    gathered from every rank: then all ranks must call it."""
    if not is_sharded(module):
        if distributed.get_rank() != 0:
            return {}
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def evaluation_copy(module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """`module` itself, or under FSDP a whole copy on every rank (`build()` on the meta device, then the gathered
    weights): evaluations run it on each rank's share of the samples, which a sharded module cannot do (its forward
    gathers its shards collectively, so every rank would have to run the same batches). Collective under FSDP; the copy
    costs one whole module of memory per process while the evaluation runs."""
    if not is_sharded(module):
        return module
    weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        copy = build()
    copy.load_state_dict(weights, assign=True)
    return copy.to(next(module.parameters()).device).eval()
