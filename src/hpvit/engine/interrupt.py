"""Stopping a training run without losing it: SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler's preemption)
asks the loop to stop after the update in progress, with a resumable checkpoint; ``--resume`` then continues
exactly. A second Ctrl-C quits at once, without that checkpoint (the last one written stays).

The handler only sets a flag (and says so on stderr): the loop polls it once per update, so the checkpoint is
written between two updates, where the state is whole, and every process of a DDP run stops at the same one.
"""

from __future__ import annotations

import os
import signal
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While open (a context manager, main thread only; elsewhere it does nothing), SIGINT and SIGTERM set
    :attr:`requested` to the signal's name instead of ending the process; a second SIGINT raises
    :class:`KeyboardInterrupt` at once. The previous handlers come back on exit."""

    def __init__(self, verbose: bool = True):
        self.requested: str | None = None
        self.verbose = verbose
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = signal.Signals(signum).name
        if self.verbose:  # os.write: a signal may arrive in the middle of a buffered write to stderr
            os.write(2, f"\n[hpvit {time.strftime('%H:%M:%S')}] {self.requested}: stopping after the current update "
                        "(or evaluation) with a resumable checkpoint; press Ctrl-C again to quit at once without "
                        "it\n".encode())


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C in a terminal reaches every process of the foreground group; a
    loader worker leaves it to the main process (which stops cleanly) instead of dying under the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
