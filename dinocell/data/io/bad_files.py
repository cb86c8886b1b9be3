"""Bookkeeping of bad files so that a long run neither crashes on one nor trains on a placeholder.

A dataset marks a sample bad (with a reason), logs one warning line with its key, and substitutes the next good
sample deterministically. The flags live in a shared-memory tensor, so DataLoader workers (fork or spawn) see each
other's findings: a known-bad field is not fetched again, and `counts()` in the main process covers all workers.

Training uses a substitute as is (a batch keeps its size). Evaluation and statistics must not count an image twice:
a dataset returns a substitute with `mark_substitute` (`meta["substituted_for"]` = the bad sample's key), and they
drop every sample for which `is_substitute` is true and report how many they dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

logger = logging.getLogger("dinocell.data")

REASONS = ("missing", "truncated", "zero_filled", "undecodable", "bad_shape", "unreachable")

T = TypeVar("T")


def mark_substitute(sample: dict[str, Any], bad_key: str) -> dict[str, Any]:
    """Record in a sample record that it stands in for the bad sample `bad_key` (returns the record)."""
    sample.setdefault("meta", {})["substituted_for"] = bad_key
    return sample


def is_substitute(sample: Mapping[str, Any]) -> bool:
    """Whether a sample record stands in for a bad one (see mark_substitute): evaluation and statistics skip it."""
    meta = sample.get("meta")
    return isinstance(meta, Mapping) and "substituted_for" in meta


class BadFileError(Exception):
    """A file that cannot give a trustworthy image; `reason` is one of REASONS."""

    def __init__(self, reason: str, key: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"bad-file reason '{reason}' is not one of {', '.join(REASONS)}")
        super().__init__(f"{reason}: {key}" + (f" ({detail})" if detail else ""))
        self.reason, self.key, self.detail = reason, key, detail


class BadSampleTracker:
    """Shared per-sample flags (0 = not known bad, i + 1 = REASONS[i]) with deterministic substitution."""

    def __init__(self, n_samples: int, max_consecutive_bad: int = 1000) -> None:
        self.flags = torch.zeros(n_samples, dtype=torch.uint8).share_memory_()
        self.max_consecutive_bad = max_consecutive_bad

    def is_bad(self, index: int) -> bool:
        return bool(self.flags[index])

    def mark(self, index: int, error: BadFileError) -> None:
        if not self.flags[index]:
            self.flags[index] = REASONS.index(error.reason) + 1
            logger.warning("bad sample %d skipped, the next good one is used instead: %s", index, error)

    def counts(self) -> dict[str, int]:
        """Distinct bad samples found so far (by any worker of this process), by reason, plus `total`."""
        hist = torch.bincount(self.flags.long(), minlength=len(REASONS) + 1).tolist()
        counts = {reason: hist[i + 1] for i, reason in enumerate(REASONS)}
        counts["total"] = sum(counts.values())
        return counts

    def first_good(self, start: int, load: Callable[[int], T]) -> tuple[int, T]:
        """`load` the sample at `start`, or the next one (wrapping) that loads; bad ones are marked on the way.

        The result depends only on which files are bad, never on timing or worker, so training stays reproducible.
        """
        n = len(self.flags)
        last: BadFileError | None = None
        for step in range(min(n, self.max_consecutive_bad)):
            index = (start + step) % n
            if self.is_bad(index):
                continue
            try:
                return index, load(index)
            except BadFileError as error:
                self.mark(index, error)
                last = error
        raise RuntimeError(
            f"no loadable sample among {min(n, self.max_consecutive_bad)} consecutive samples from index {start} "
            f"(last error: {last}); check the data location and credentials"
        )
