"""Stopping a run on a signal: Ctrl-C (SIGINT), SIGTERM (what SLURM and Kubernetes send before they kill a job)
and SIGUSR1 (SLURM's pre-emption warning with ``--signal``) all save the run and say how to resume it.

The handler only records the signal; the training loop stops at the next optimizer step (a state it can save:
no half-applied update), writes ``last.pt`` there and raises :class:`Stopped`. A second signal stops at once
(a loader that hangs must not hold Ctrl-C hostage): the last checkpoint written before it is what resumes. The
same signal again within :data:`REPEAT_S` is the first one delivered twice (to a torchrun worker directly and
through its agent), not a second.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["STOP_SIGNALS", "Stopped", "StopRequest", "ignore_stop_signals", "stop_on_signals"]

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))
"""Signals that stop a run with a checkpoint (SIGUSR1 does not exist on Windows)."""


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal; ``signum`` names it (the exit status is 128 + signum, as a shell reports a
    process a signal ended). A KeyboardInterrupt, so whatever handles Ctrl-C handles it."""

    def __init__(self, signum: int, saved: bool):
        self.signum, self.saved = signum, saved
        super().__init__(signal.Signals(signum).name)


REPEAT_S = 2.0
"""The same signal again within this many seconds is the first one delivered twice, not a second: a scheduler
that signals every process of a job (SLURM's scancel, a time limit) reaches torchrun's workers directly and
through their agent, which passes it on."""


class StopRequest:
    """The signal received, if any; the loop asks ``pending`` at each optimizer step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0

    @property
    def pending(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.signum is not None:
            if signum == self.signum and now - self._at < REPEAT_S:
                return  # the first one, delivered again
            raise Stopped(signum, saved=False)  # the second signal: stop now
        self.signum, self._at = signum, now


@contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[StopRequest]:
    """Install :class:`StopRequest`'s handler for :data:`STOP_SIGNALS` for the block, then restore the previous
    handlers. Off the main thread (where Python allows no handler) or when not ``enabled`` it only yields an
    empty request: signals keep their own behaviour."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A data loader worker's ``worker_init_fn``: the stop signals are the training process's to handle. A
    signal to the process group (a terminal's Ctrl-C, ``kill -- -PGID``, torchrun's agent, which signals each
    worker's group) otherwise ended the workers too (SIGTERM's default, SIGINT's quiet exit), and the training
    process failed on "DataLoader worker ... is killed by signal" before its stop could save. A worker still ends
    with its iterator, and on its own when the training process dies (torch's workers watch their parent)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
