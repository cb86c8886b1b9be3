"""Skipped non-finite steps: counted without a host read per step, and the stop after too many in a row.

The training step leaves its decision on the device (`StepResult.finite`, dinocell.train.step). Reading it back at
every iteration would make the host wait for the GPU at every iteration; `NonFiniteSteps` keeps the flags and reads
them in one go where the loop reads the device anyway (metrics lines, checkpoints), or at once where a read costs
nothing (off CUDA). The count, the warnings (one per skipped step, naming its iteration) and the stop after
train.max_consecutive_nonfinite skipped steps in a row are the same either way; on CUDA the stop comes at the next
read, at most train.log_every iterations later. The steps in between were skipped too, so nothing was written from a
poisoned state.
"""

from __future__ import annotations

import logging

import torch

from dinocell.errors import UserError

logger = logging.getLogger("dinocell")


class NonFiniteLossError(UserError, RuntimeError):
    """Raised after train.max_consecutive_nonfinite non-finite steps in a row."""

    exit_code = 1


class NonFiniteSteps:
    """`record(finite, iteration)` after every step, `read()` where the count is needed (it returns the count)."""

    def __init__(self, max_consecutive: int, *, count: int, read_every_step: bool) -> None:
        self.max_consecutive = max_consecutive
        self.count = count  # skipped steps since the run started (restored from the checkpoint on resume)
        self.in_a_row = 0
        self.read_every_step = read_every_step
        self._pending: list[tuple[int, torch.Tensor]] = []

    def record(self, finite: torch.Tensor, iteration: int) -> None:
        """Keep one step's flag (read at once when reads are free); may raise NonFiniteLossError."""
        self._pending.append((iteration, finite))
        if self.read_every_step:
            self.read()

    def read(self) -> int:
        """Read the kept flags back (one host read), warn about each skipped step, and raise NonFiniteLossError at the
        limit; returns the number of skipped steps so far."""
        if not self._pending:
            return self.count
        flags = torch.stack([finite for _, finite in self._pending]).tolist()
        iterations = [iteration for iteration, _ in self._pending]
        self._pending.clear()
        for iteration, finite in zip(iterations, flags):
            if finite:
                self.in_a_row = 0
                continue
            self.count += 1
            self.in_a_row += 1
            logger.warning("iteration %d: non-finite loss or gradient, step skipped (%d in a row, %d in total)",
                           iteration, self.in_a_row, self.count)
            if self.in_a_row >= self.max_consecutive:
                raise NonFiniteLossError(
                    f"stopping: {self.in_a_row} non-finite losses in a row at iteration {iteration} "
                    f"(train.max_consecutive_nonfinite={self.max_consecutive}); no checkpoint was written from this "
                    "state. Lower optim.lr, raise the warm-up, or check the data for NaN/inf."
                )
        return self.count
