"""Process-group set-up and the few collectives the trainer needs.

A run is distributed when torchrun's environment is present (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or
when started by Slurm's `srun` with several tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first
node of the job unless MASTER_ADDR is set, on port MASTER_PORT or one derived from the job id); otherwise it is one
process and every helper here degrades to a no-op, so the same code path runs everywhere. Backend: nccl on CUDA, gloo
on CPU.
"""

from __future__ import annotations

import gc
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Slurm jobs that share a node must not share a rendezvous port: each job's port is derived from its id, in a range
# below Linux's ephemeral ports (32768-60999), which the kernel hands out to outgoing connections.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 12000


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _torchrun_env_from_slurm() -> None:
    """Translate an `srun` task's Slurm variables into torchrun's, unless torchrun's are already there."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        command = ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]]
        hosts = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = hosts[0]
    job_port = SLURM_PORT_BASE + int(os.environ.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN
    os.environ.setdefault("MASTER_PORT", str(job_port))


def init_distributed(timeout_min: float | None = None) -> DistInfo:
    """Join the process group described by torchrun's (or srun's) environment, or run as a single process.

    `timeout_min`: how long a collective (or the start-up rendezvous) may wait for the slowest rank before the job
    fails; None keeps torch's default (10 min with nccl, 30 min with gloo)."""
    _torchrun_env_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = None if timeout_min is None else timedelta(minutes=timeout_min)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; the input is left untouched)."""
    out = tensor.detach().clone()
    if is_enabled():
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def destroy() -> None:
    if is_enabled():
        dist.destroy_process_group()


@contextmanager
def process_group_ends() -> Iterator[None]:
    """Tear the process group down when the block ends, so that no process aborts at exit.

    A group that is still alive when the interpreter shuts down (held by a DDP wrapper, say) has gloo threads that
    die there with "terminate called without an active exception", turning a finished run into a failed one (about
    1 two-process run in 20). So: a barrier, once the block ran to its end (every rank is done with the group), then
    the group is destroyed and what still refers to it is collected while the interpreter runs. After an error there
    is no barrier: the other ranks, perhaps waiting in a collective, then fail instead of hanging until the timeout."""
    try:
        yield
    except BaseException:
        destroy()
        raise
    barrier()
    destroy()
    gc.collect()


def all_gather_object(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (a one-element list in a single process)."""
    if not is_enabled():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered

