"""Remember a stop request (SIGTERM / SIGUSR1) from the first moment of a training process.

Slurm preemption and job-chain tools send SIGTERM at any time; one that arrived during start-up killed the
process with the default action (exit 1 / -15, which breaks ``afterok`` chains). Installed first thing,
this handler only records the signal; the trainer checks it before its first step and after every step,
and stops with exit 0 in a state that ``--resume`` continues. Commands that do not train put the default
handlers back with :func:`restore_default`, which re-delivers a signal received in the meantime.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: Optional[int] = None


def _record(signum: int, _frame: object) -> None:
    global _received
    _received = signum


def install() -> None:
    """Record SIGTERM / SIGUSR1 instead of dying (only in the main thread, where Python allows handlers)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _record)


def received() -> Optional[int]:
    """The signal received so far, if any."""
    return _received


def restore_default() -> None:
    """Default handlers again; a signal that arrived while recording is delivered now."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    if _received is not None:
        os.kill(os.getpid(), _received)
