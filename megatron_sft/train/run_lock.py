"""One run per output directory: an exclusive ``flock`` on ``OUTPUT/.run.lock``.

Two runs writing into one directory interleave ``metrics.jsonl`` and overwrite each other's checkpoints
without a word, so the first holder of the lock wins and a second run is refused at once, naming the
holder's PID and host. The lock belongs to the open file, so the kernel drops it when the holding process
dies (even by SIGKILL): a crashed run never leaves a stale lock and ``--resume`` needs no clean-up. The
file itself stays (it only records who holds the lock).

With ``--nproc`` the launcher takes the lock before it starts the workers and tells them through
``HELD_ENV``; under torchrun/Slurm global rank 0 takes it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

LOCK_FILE = ".run.lock"
HELD_ENV = "MEGATRON_SFT_RUN_LOCK_HELD"  # the output directory whose lock this process's launcher holds


class RunLockedError(RuntimeError):
    """Another live run holds the output directory."""


def _lock_or_refuse(fd: int, directory: Path) -> None:
    """Take the exclusive lock on ``fd`` without waiting; RunLockedError naming the holder if another has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        raise RunLockedError(f"{directory} is in use by another run ({holder}); wait for it to finish or stop it, "
                             "or choose another output_dir") from None


class RunLock:
    """An acquired lock; :meth:`release` (or the process's end) frees it."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # close-on-exec: children do not inherit it
        try:
            _lock_or_refuse(fd, self.path.parent)
        except RunLockedError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def lock_held_by_launcher(output_dir: str | Path) -> bool:
    """Whether the ``--nproc`` launcher that started this worker already holds ``output_dir``'s lock."""
    held = os.environ.get(HELD_ENV)
    return held is not None and os.path.realpath(held) == os.path.realpath(output_dir)


def lock_for_training(output_dir: str | Path, rank: int) -> Optional[RunLock]:
    """Rank 0 takes the lock unless its launcher holds it already; other ranks hold none."""
    if rank != 0 or lock_held_by_launcher(output_dir):
        return None
    return RunLock(output_dir).acquire()


def check_not_in_use(output_dir: str | Path) -> None:
    """Refuse at once (RunLockedError naming the holder) when another live run holds ``output_dir``: checked
    first, so that a directory in use is reported as such rather than by what that run has written there. Only
    for a single launcher: under torchrun/Slurm a probe on one rank could meet rank 0's own lock."""
    path = Path(output_dir) / LOCK_FILE
    if not path.exists() or lock_held_by_launcher(output_dir):
        return
    fd = os.open(path, os.O_RDONLY)  # a probe: it writes nothing, a refused run changes nothing
    try:
        _lock_or_refuse(fd, path.parent)
    finally:
        os.close(fd)
