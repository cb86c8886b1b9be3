"""Bookkeeping of bad files so that a long run neither crashes on one nor trains on a placeholder.

A dataset marks a sample bad (with a reason), logs one warning line with its key, and substitutes the next good
sample deterministically. The flags live in a shared-memory tensor, so DataLoader workers (fork or spawn) see each
other's findings: a known-bad field is not fetched again, and `counts()` in the main process covers all workers.

Training wants the substitute (a fixed batch size, no crash); evaluation and statistics must not count it twice. So a
substitute carries `meta["substituted_for"]` (the id of the bad sample) and `meta["bad_reason"]`: training ignores
them, and evaluation skips the sample (`is_substitute`) and counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from dinocell.data.dataset import DatasetError

logger = logging.getLogger("dinocell.data")

REASONS = ("missing", "truncated", "zero_filled", "undecodable", "bad_shape", "unreachable")
SUBSTITUTED_FOR = "substituted_for"  # meta key of a substitute: the id of the bad sample it stands in for
BAD_REASON = "bad_reason"  # meta key of a substitute: why the sample it stands in for is bad (one of REASONS)

T = TypeVar("T")


class BadFileError(Exception):
    """A file that cannot give a trustworthy image; `reason` is one of REASONS."""

    def __init__(self, reason: str, key: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"bad-file reason '{reason}' is not one of {', '.join(REASONS)}")
        super().__init__(f"{reason}: {key}" + (f" ({detail})" if detail else ""))
        self.reason, self.key, self.detail = reason, key, detail


class BadSampleTracker:
    """Shared per-sample flags (0 = not known bad, i + 1 = REASONS[i]) with deterministic substitution."""

    def __init__(self, n_samples: int, max_consecutive_bad: int = 1000, max_consecutive_unreachable: int = 8) -> None:
        self.flags = torch.zeros(n_samples, dtype=torch.uint8).share_memory_()
        self.max_consecutive_bad = max_consecutive_bad
        # an outage makes every sample unreachable (each after its retries): stop soon with the reason instead of
        # walking through max_consecutive_bad samples for an hour
        self.max_consecutive_unreachable = max_consecutive_unreachable

    def is_bad(self, index: int) -> bool:
        return bool(self.flags[index])

    def mark(self, index: int, error: BadFileError) -> None:
        if not self.flags[index]:
            self.flags[index] = REASONS.index(error.reason) + 1
            logger.warning("bad sample %d skipped, the next good one is used instead: %s", index, error)

    def substitute_meta(self, wanted: int, wanted_id: str) -> dict[str, str]:
        """The meta entries of a sample returned in place of bad sample `wanted` (whose id is `wanted_id`)."""
        return {SUBSTITUTED_FOR: wanted_id, BAD_REASON: REASONS[int(self.flags[wanted]) - 1]}

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
        unreachable = 0
        for step in range(min(n, self.max_consecutive_bad)):
            index = (start + step) % n
            if self.is_bad(index):
                continue
            try:
                return index, load(index)
            except BadFileError as error:
                self.mark(index, error)
                last = error
                unreachable = unreachable + 1 if error.reason == "unreachable" else 0
                if unreachable >= self.max_consecutive_unreachable:
                    raise DatasetError(
                        f"{unreachable} samples in a row could not be reached (last: {error}): the storage or the "
                        "network is down or refuses the requests; check the endpoint (endpoint_url), the network "
                        "(proxy, firewall, VPN) and the credentials, then rerun (training resumes from its newest "
                        "checkpoint)"
                    ) from error
        raise DatasetError(
            f"no loadable sample among {min(n, self.max_consecutive_bad)} consecutive samples from index {start} "
            f"(last error: {last}); check the dataset string's keys (e.g. channels=), the data location and credentials"
        )


def is_substitute(sample: dict) -> bool:
    """True when `sample` stands in for a bad one: evaluation and statistics skip it instead of counting it twice."""
    return SUBSTITUTED_FOR in (sample.get("meta") or {})
