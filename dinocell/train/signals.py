"""Stopping a run on a signal, cleanly: SIGTERM (what Slurm, Kubernetes and torchrun send before they kill) either
stops the run at once, like Ctrl-C, or, with `checkpointing.save_on_sigterm`, at the next iteration boundary after a
checkpoint has been written. The command then says which checkpoint a rerun resumes from (dinocell.commands.train).
Other code can ask for the same checkpointed stop with `request_stop` (submitit's requeue signal does:
dinocell.run.submit).

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
    """A stop signal ended the run; str() says which ("SIGTERM", ...). Raised where the run stops, as
    KeyboardInterrupt is for Ctrl-C (a BaseException for the same reason: code that catches Exception must not
    swallow it)."""


class StopRequest:
    """Set when this process is asked to stop; the training loop asks `agreed()` once per iteration."""

    def __init__(self) -> None:
        self.reason: str | None = None  # what asked, e.g. "SIGTERM"; None: nothing asked this process

    @property
    def received(self) -> bool:
        return self.reason is not None

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank has been asked to stop. Collective: every rank calls it each iteration."""
        flag = torch.tensor(float(self.received), device=device)
        return bool(distributed.all_reduce_mean(flag) > 0)

    def stopped(self) -> Terminated:
        """The exception that ends the run once the ranks agreed (a rank that was not asked names the others)."""
        return Terminated(self.reason or "a stop request on another process")


_listening: StopRequest | None = None  # the running loop's request, while sigterm_stops_run saves checkpoints


def request_stop(reason: str) -> bool:
    """Ask the running training loop to stop at the next iteration boundary after a checkpoint, as SIGTERM does.
    False when no loop listens (none runs yet, or `checkpointing.save_on_sigterm` is off): the caller stops otherwise.
    Safe to call from a signal handler."""
    if _listening is None:
        return False
    if not _listening.received:
        _listening.reason = reason
        logger.warning("%s: stopping after this iteration, with a checkpoint", reason)
    return True


@contextmanager
def sigterm_stops_run(save_checkpoint: bool) -> Iterator[StopRequest | None]:
    """Handle SIGTERM in this process while the block runs; yields the StopRequest the loop polls when
    `save_checkpoint`, else None (SIGTERM then raises Terminated at once).

    A process forked meanwhile inherits the handler, which does nothing there: the main process decides how the run
    stops. (DataLoader workers replace it with torch's own, then ignore SIGTERM: dinocell.pipeline.loaders.)
    """
    global _listening
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield None
        return
    owner = os.getpid()
    request = StopRequest() if save_checkpoint else None

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            return
        if request is None or request.received:  # no checkpoint wanted, or a second stop request: stop now
            raise Terminated("SIGTERM")
        request.reason = "SIGTERM"
        logger.warning("SIGTERM: stopping after this iteration, with a checkpoint (send it again to stop at once)")

    previous = signal.signal(signal.SIGTERM, handler)
    _listening = request
    try:
        yield request
    finally:
        _listening = None
        signal.signal(signal.SIGTERM, previous)
