"""One optimisation step, including what happens when it goes wrong.

A step whose loss (averaged over ranks) or gradient norm is not finite is skipped as a whole: no optimiser update, no
teacher EMA, no center update. Because the model's forward has no side effects on its state, skipping needs no
rollback. Backward still runs on such a step, since DistributedDataParallel expects one backward per forward; the
gradients are averaged over ranks by then, so every rank sees the same norm and takes the same decision.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from dinocell import distributed, parallel
from dinocell.config.schema import AUTOCAST_DTYPES
from dinocell.pipeline.batch import SSLBatch
from dinocell.train.meta_arch import SSLMetaArch
from dinocell.train.optim import apply_schedule


class StepResult(NamedTuple):
    loss: torch.Tensor  # total loss averaged over ranks
    terms: dict[str, torch.Tensor]  # this rank's detached loss terms
    grad_norm: torch.Tensor  # before clipping
    finite: bool  # False: the step was skipped


class TrainStep:
    """Callable `(batch, scheduled values) -> StepResult` for one model and optimiser."""

    def __init__(
        self,
        model: SSLMetaArch,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        clip_grad: float,
        autocast_dtype: str,
    ) -> None:
        self.model = model
        self.forward = parallel.wrap_model(model, device)
        self.optimizer = optimizer
        self.params = [p for p in model.student.parameters() if p.requires_grad]
        self.max_norm = clip_grad if clip_grad > 0 else math.inf
        dtype = getattr(torch, AUTOCAST_DTYPES[autocast_dtype])
        use_autocast = device.type == "cuda" and dtype != torch.float32  # the CPU path always runs fp32
        self.autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if use_autocast else contextlib.nullcontext

    def __call__(self, batch: SSLBatch, values: dict[str, float]) -> StepResult:
        apply_schedule(
            self.optimizer, lr=values["lr"], last_layer_lr=values["last_layer_lr"], weight_decay=values["weight_decay"]
        )
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.forward(batch, teacher_temp=values["teacher_temp"])
        out.loss.backward()
        grad_norm = parallel.clip_grad_norm(self.params, self.max_norm)
        loss = distributed.all_reduce_mean(out.loss)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.model.update_teacher(values["momentum"], out.centers)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, out.terms, grad_norm, finite)
