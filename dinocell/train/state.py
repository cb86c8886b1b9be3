"""The training state: everything a checkpoint holds, saved and restored through one pair of methods.

`state_dict()` is what a checkpoint writes and `load_state_dict()` is what a resume reads: the model (the method's
state: DINO's student, teacher and EMA centers; SimCLR's student), the optimiser, the iteration (which is also the
data stream's position: the sampler restarts at that global batch), the count of skipped non-finite steps, the best
validation value and early-stopping count, and every rank's RNG state (drop path and RoPE augmentation draw from the
process's global generators).

A sharded run (`train.parallelism=fsdp`) states the model as DTensor shards and the optimiser keyed by parameter name
(torch.distributed.checkpoint.state_dict), which lets DCP reshard both to another number of processes. Either kind of
run loads either kind of checkpoint.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from dinocell import distributed, parallel
from dinocell.train.checkpoint import capture_rng_state, restore_rng_state
from dinocell.train.early_stopping import EarlyStopping

logger = logging.getLogger("dinocell")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainState:
    """Model + optimiser + progress of a run; `data` identifies the sample stream the iteration counts in."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        early_stopping: EarlyStopping,
        *,
        global_batch_size: int,
        seed: int,
        sharded: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.early_stopping = early_stopping
        self.sharded = sharded  # checkpoints in the sharded layout (dinocell.train.checkpoint)
        self.iteration = 0
        self.nonfinite_count = 0
        self.data = {"global_batch_size": global_batch_size, "seed": seed}
        self._rng_states: list[dict[str, Any]] | None = None

    def sharded_template(self) -> dict[str, Any]:
        """This run's model and optimiser state in the sharded layout's form (what a sharded checkpoint loads into)."""
        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint contents. Collective: every rank must call it (the RNG states are gathered)."""
        tensors = (self.sharded_template() if self.sharded
                   else {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})
        return {
            **tensors,
            "iteration": self.iteration,
            "nonfinite_count": self.nonfinite_count,
            "early_stopping": self.early_stopping.state_dict(),
            "data": dict(self.data),
            "rng": distributed.all_gather_object(capture_rng_state()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint; the RNG states are applied later by `seed_loop_rng` (after the loader exists)."""
        model, optimizer = state["model"], state["optimizer"]
        by_index = isinstance(optimizer["param_groups"][0]["params"][0], int)  # a single-file checkpoint's optimiser
        if by_index and not parallel.is_sharded(self.model):
            self.model.load_state_dict(model)
            self.optimizer.load_state_dict(optimizer)
        else:
            whole = not any(isinstance(v, DTensor) for v in model.values())  # a single file read by a sharded run
            set_state_dict(self.model, self.optimizer, model_state_dict=model,
                           optim_state_dict=self._keyed_by_name(optimizer) if by_index else optimizer,
                           options=StateDictOptions(full_state_dict=whole and parallel.is_sharded(self.model)))
        self.iteration = state["iteration"]
        self.nonfinite_count = state["nonfinite_count"]
        if "early_stopping" in state:  # checkpoints written before validation existed have none
            self.early_stopping.load_state_dict(state["early_stopping"])
        # checkpoints of dinocell 0.1 (before this class) kept the same facts under "sampler"
        data = state["data"] if "data" in state else {k: state["sampler"][k] for k in self.data}
        if data != self.data:
            logger.warning(
                "the checkpoint was written with %s, this run has %s: the data stream restarts at global batch %d of "
                "the new setting, so the order of samples differs from an uninterrupted run", data, self.data,
                self.iteration,
            )
        self._rng_states = state["rng"]

    def _keyed_by_name(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        """A torch optimiser state dict (parameters numbered in param_groups order) keyed by parameter name instead."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        order = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        return {
            "state": {order[i]: value for i, value in optimizer["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optimizer["param_groups"]],
        }

    def seed_loop_rng(self, rank: int, world_size: int, seed: int) -> None:
        """Set the training loop's random stream: the checkpoint's state of this rank when resuming.

        Called after the data loader is built, because building it draws from the global generator: restoring before
        would shift a resumed run's stream by one draw.
        """
        if self._rng_states is None:
            seed_everything(seed + rank)
        elif len(self._rng_states) == world_size:
            restore_rng_state(self._rng_states[rank])
        else:
            logger.warning("checkpoint holds RNG states of %d ranks, this run has %d: reseeding",
                           len(self._rng_states), world_size)
            seed_everything(seed + rank + self.iteration)
        self._rng_states = None
