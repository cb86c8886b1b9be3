"""Per-iteration schedules (lr, weight decay; for DINO also last-layer lr, teacher momentum, teacher temperature) as
plain arrays.

Pure functions of the config and the iteration count, so that a resumed run reads exactly the same values as an
uninterrupted one: nothing here carries state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinocell.config.schema import SSLConfig


def warmup_cosine(
    start: float, peak: float, end: float, *, warmup_iters: int, total_iters: int
) -> np.ndarray:
    """Linear ramp start -> peak over `warmup_iters`, then half-cosine peak -> end over the remaining iterations."""
    if total_iters <= 0:
        raise ValueError(f"total_iters must be > 0, got {total_iters}")
    warmup_iters = min(max(warmup_iters, 0), total_iters)
    warmup = np.linspace(start, peak, warmup_iters, endpoint=False)
    n_cos = total_iters - warmup_iters
    steps = np.arange(n_cos)
    cosine = end + 0.5 * (peak - end) * (1 + np.cos(np.pi * steps / max(n_cos, 1)))
    return np.concatenate([warmup, cosine])


def warmup_constant(start: float, end: float, *, warmup_iters: int, total_iters: int) -> np.ndarray:
    """Linear ramp start -> end over `warmup_iters`, then constant (the teacher temperature schedule)."""
    warmup_iters = min(max(warmup_iters, 0), total_iters)
    warmup = np.linspace(start, end, warmup_iters, endpoint=False)
    return np.concatenate([warmup, np.full(total_iters - warmup_iters, end)])


@dataclass(frozen=True)
class Schedules:
    """Every scheduled value, one entry per iteration; the DINO-only ones are None for SimCLR."""

    lr: np.ndarray
    weight_decay: np.ndarray
    last_layer_lr: np.ndarray | None = None  # the heads' last layers (DINO; frozen for the first epochs)
    momentum: np.ndarray | None = None  # teacher EMA momentum (DINO)
    teacher_temp: np.ndarray | None = None  # teacher temperature (DINO)

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, iteration: int) -> dict[str, float]:
        """The values of `iteration` by name (only the schedules this run has)."""
        return {name: float(values[iteration]) for name in self.__dataclass_fields__
                if (values := getattr(self, name)) is not None}


def build_schedules(cfg: SSLConfig, *, peak_lr: float) -> Schedules:
    """Schedules of a whole run; `peak_lr` is the base lr after the batch-size scaling rule."""
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch
    lr = warmup_cosine(0.0, peak_lr, cfg.optim.min_lr, warmup_iters=cfg.optim.warmup_epochs * epoch, total_iters=total)
    wd = warmup_cosine(
        cfg.optim.weight_decay, cfg.optim.weight_decay, cfg.optim.weight_decay_end, warmup_iters=0, total_iters=total
    )
    if cfg.method == "simclr":  # no teacher, no head with a last layer to freeze
        return Schedules(lr=lr, weight_decay=wd)
    last_layer_lr = lr.copy()
    # The heads' last layers stay frozen for the first epochs (DINO: stabilises the prototypes early on).
    last_layer_lr[: cfg.optim.freeze_last_layer_epochs * epoch] = 0.0
    momentum = warmup_cosine(
        cfg.teacher.momentum_teacher,
        cfg.teacher.momentum_teacher,
        cfg.teacher.final_momentum_teacher,
        warmup_iters=0,
        total_iters=total,
    )
    teacher_temp = warmup_constant(
        cfg.teacher.warmup_teacher_temp,
        cfg.teacher.teacher_temp,
        warmup_iters=cfg.teacher.warmup_teacher_temp_epochs * epoch,
        total_iters=total,
    )
    return Schedules(lr=lr, last_layer_lr=last_layer_lr, weight_decay=wd, momentum=momentum, teacher_temp=teacher_temp)
