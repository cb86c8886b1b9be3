"""One optimisation step over one or more micro-batches, including what happens when it goes wrong.

Gradient accumulation (`train.grad_accum_steps` = k): each micro-batch's loss is computed on its own and
back-propagated scaled by 1/k, so the step's gradient is the mean of the k micro-batch gradients; with several
processes DistributedDataParallel averages them over processes once, on the last micro-batch (`no_sync` before).
Per-image terms (DINO's cross-entropies and iBOT given their targets) then give exactly the gradient of one k-times
larger batch. Batch-level computations see the micro-batch of all processes instead: BatchNorm statistics,
Sinkhorn-Knopp's normalisation, KoLeo's nearest neighbours and NT-Xent's negatives (2bW - 2 per view rather than
2bWk - 2, for b images per process and W processes). The forwards' `updates` are sums over their batch (DINO: the
teacher-logit sums and counts of the EMA centers) and are added up over the micro-batches, so what follows the step
is exactly that of the large batch.

A step whose loss (averaged over micro-batches and ranks) or gradient norm is not finite is skipped as a whole: no
optimiser update, no teacher EMA, no center update. Because the model's forward has no side effects on its state,
skipping needs no rollback. Backward still runs on such a step, since DistributedDataParallel expects one backward per
forward; the gradients are averaged over ranks by then, so every rank sees the same norm and takes the same decision.

Where the decision is made: with a fused AdamW (the trainer's optimiser on CUDA) on the device, without reading
anything back: the fused kernel takes `found_inf` and leaves parameters, moments and step counts untouched where it
is set, and `after_step(..., taken)` selects the EMA and the centers on the device. So a step queues its work and
returns at once, and the GPU never waits for the host. Other optimisers (torch's default AdamW, the CPU reference)
cannot skip on the device: the host reads the flag and skips the calls, which on a CPU costs nothing. Either way
`StepResult.finite` is a bool tensor; the loop reads it in batches (dinocell.train.nonfinite).

Batches with crops.gpu_augmentations carry their photometric parameters; `SSLBatch.finish_crops` applies them on the
device first, outside autocast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

from dinocell import distributed, parallel
from dinocell.config.schema import AUTOCAST_DTYPES
from dinocell.pipeline.batch import SSLBatch
from dinocell.train.methods import SSLMethod
from dinocell.train.optim import apply_schedule


class StepResult(NamedTuple):
    loss: torch.Tensor  # total loss averaged over micro-batches and ranks
    terms: dict[str, torch.Tensor]  # this rank's detached loss terms, averaged over micro-batches
    grad_norm: torch.Tensor  # before clipping
    finite: torch.Tensor  # bool, on the device; False: the step was skipped


def autocast_context(device: torch.device, autocast_dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's autocast context: `autocast_dtype` on CUDA; the CPU path always runs fp32."""
    dtype = getattr(torch, AUTOCAST_DTYPES[autocast_dtype])
    if device.type == "cuda" and dtype != torch.float32:
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.stack(list(tensors)).mean(dim=0)


class TrainStep:
    """Callable `(micro-batches, scheduled values) -> StepResult` for one method and optimiser."""

    def __init__(
        self,
        model: SSLMethod,
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
        self.autocast = autocast_context(device, autocast_dtype)
        self.skips_on_device = bool(optimizer.defaults.get("fused"))  # fused AdamW takes found_inf

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP averages gradients over processes only in the last micro-batch's backward."""
        if last or self.forward is self.model:
            return contextlib.nullcontext()
        return self.forward.no_sync()

    def __call__(self, micro_batches: Sequence[SSLBatch], values: Mapping[str, float]) -> StepResult:
        apply_schedule(
            self.optimizer, lr=values["lr"], weight_decay=values["weight_decay"],
            last_layer_lr=values.get("last_layer_lr"),
        )
        self.optimizer.zero_grad(set_to_none=True)
        inputs = {name: values[name] for name in self.model.SCHEDULED_INPUTS}
        k = len(micro_batches)
        losses, terms, updates = [], [], []
        for i, batch in enumerate(micro_batches):
            batch = batch.finish_crops()  # crops.gpu_augmentations: the crops' pending work, on the device
            with self._gradient_sync(last=i == k - 1):
                with self.autocast():
                    out = self.forward(batch, **inputs)
                (out.loss / k).backward()
            losses.append(out.loss.detach())
            terms.append(out.terms)
            updates.append(out.updates)
        grad_norm = parallel.clip_grad_norm(self.params, self.max_norm)
        loss = distributed.all_reduce_mean(_mean(losses))
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        summed = {name: sum(u[name] for u in updates) for name in updates[0]}
        if self.skips_on_device:
            self.optimizer.found_inf = (~finite).float()  # read by the fused kernel: 1 = skip this step
            self.optimizer.step()
            del self.optimizer.found_inf  # as GradScaler does: never left for a later step() to read
            self.model.after_step(values, summed, finite)
        elif finite:  # a host read: free on a CPU
            self.optimizer.step()
            self.model.after_step(values, summed)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, {name: _mean([t[name] for t in terms]) for name in terms[0]}, grad_norm, finite)
