"""Which validation result is the best so far (ckpt/best), and when a run stops early.

One metric (`checkpointing.best_metric`: val_loss, lower is better; knn_top1, higher is better) drives both:
- the best checkpoint is the validation with the best value so far (any strict improvement; ties keep the older);
- early stopping counts validations in a row that fail to beat a *reference* value by more than `min_delta`; a
  validation that does beat it resets the count and becomes the new reference (so a slow steady gain of less than
  `min_delta` per validation still resets the count once the gains add up, as in Keras' EarlyStopping). After
  `patience` such validations the run stops; patience 0 never stops.
A non-finite value (a diverged validation) is never the best and never an improvement.
The state is part of the checkpoint (TrainState), so a resumed run stops at the same iteration.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from dinocell.config.schema import BEST_METRICS

logger = logging.getLogger("dinocell")


class EarlyStopping:
    """Best value of `metric` so far and the early-stopping count."""

    def __init__(self, metric: str, *, patience: int, min_delta: float) -> None:
        if metric not in BEST_METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(BEST_METRICS)}")
        self.metric = metric
        self.sign = 1.0 if BEST_METRICS[metric] == "min" else -1.0  # compare sign * value: lower is better
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_iteration: int | None = None
        self.reference: float | None = None
        self.bad_validations = 0

    def _beats(self, value: float, other: float | None, margin: float) -> bool:
        return other is None or self.sign * value < self.sign * other - margin

    def update(self, value: float, iteration: int) -> bool:
        """Record a validation result of iteration `iteration`; True when it is the best so far."""
        if not math.isfinite(value):
            self.bad_validations += 1
            return False
        if self._beats(value, self.reference, self.min_delta):
            self.reference, self.bad_validations = value, 0
        else:
            self.bad_validations += 1
        if self._beats(value, self.best, 0.0):
            self.best, self.best_iteration = value, iteration
            return True
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_validations >= self.patience

    def summary(self) -> str:
        """Why the run stops, and where the best model is."""
        best = (f"best {self.best:.4f} at iteration {self.best_iteration} (ckpt/best)" if self.best is not None
                else "no finite value, so no best checkpoint")
        window = f"{self.bad_validations} validations"
        return f"{self.metric} did not improve by more than {self.min_delta:g} for {window}; {best}"

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "best_iteration": self.best_iteration,
                "reference": self.reference, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counts; a checkpoint of a run that selected by another metric starts the tracking afresh."""
        if state["metric"] != self.metric:
            logger.warning("the checkpoint tracked %s, this run selects by %s: best value and early-stopping count "
                           "start afresh", state["metric"], self.metric)
            return
        self.best, self.best_iteration = state["best"], state["best_iteration"]
        self.reference, self.bad_validations = state["reference"], state["bad_validations"]
