"""Stopping a run on a signal, cleanly: SIGTERM (what Slurm, Kubernetes and torchrun send before they kill) either
stops the run at once, like Ctrl-C, or, with `checkpointing.save_on_sigterm`, at the next iteration boundary after a
checkpoint has been written. The command then says which checkpoint a rerun resumes from (dinocell.commands.train).

Every rank must stop at the same iteration, or the others would wait forever in the next collective: the request is
reduced over the ranks each iteration (`StopRequest.agreed`), so a signal seen by one rank stops them all.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dinocell import distributed

logger = logging.getLogger("dinocell")


class Terminated(BaseException):
    """SIGTERM arrived: raised where the run stops, as KeyboardInterrupt is for Ctrl-C (a BaseException for the same
    reason: code that catches Exception must not swallow it)."""


class StopRequest:
    """Set by the SIGTERM handler; the training loop asks `agreed()` once per iteration."""

    def __init__(self) -> None:
        self.received = False

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank has received SIGTERM. Collective: every rank calls it each iteration."""
        flag = torch.tensor(float(self.received), device=device)
        return bool(distributed.all_reduce_mean(flag) > 0)


@contextmanager
def sigterm_stops_run(save_checkpoint: bool) -> Iterator[StopRequest | None]:
    """Handle SIGTERM in this process while the block runs; yields the StopRequest the loop polls when
    `save_checkpoint`, else None (SIGTERM then raises Terminated at once).

    A process forked meanwhile inherits the handler, which does nothing there: the main process decides how the run
    stops. (DataLoader workers replace it with torch's own, then ignore SIGTERM: dinocell.pipeline.loaders.)
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield None
        return
    owner = os.getpid()
    request = StopRequest() if save_checkpoint else None

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            return
        if request is None or request.received:  # no checkpoint wanted, or a second SIGTERM: stop now
            raise Terminated
        request.received = True
        logger.warning("SIGTERM: stopping after this iteration, with a checkpoint (send it again to stop at once)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)
