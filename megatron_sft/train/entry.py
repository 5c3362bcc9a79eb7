"""How a training run starts: in this process (under torchrun/Slurm, or one process) or on N local workers,
after the cheap checks, and which errors are the user's to fix. ``megatron-sft train``, the demo and the
continuum all start training here."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Optional

from megatron_sft.config import Config


def train_worker(config_dict: dict, resume: bool = False) -> dict:
    """One rank's training run from a plain config dict (picklable, for spawned local workers)."""
    from megatron_sft.config import config_from_dict
    from megatron_sft.train.trainer import train

    return asdict(train(config_from_dict(config_dict), resume=resume))


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (bad input, a refusal): one line and exit 2, no traceback."""
    from megatron_sft.config import ConfigError
    from megatron_sft.data.sources import DataError
    from megatron_sft.objectives import ObjectiveSpecError
    from megatron_sft.train.checkpoint_integrity import CheckpointDamagedError
    from megatron_sft.train.run_lock import RunLockedError
    from megatron_sft.train.save_guard import NoSpaceError

    return (ConfigError, DataError, ObjectiveSpecError, FileNotFoundError, RunLockedError, CheckpointDamagedError,
            NoSpaceError)


def launch_training(config: Config, resume: bool = False, nproc: Optional[int] = None) -> Optional[dict]:
    """Train in this process (under torchrun/Slurm or single-process) or on ``nproc`` local workers, after the
    cheap checks (preflight.py). With ``nproc`` this process holds the run lock (run_lock.py) throughout.
    None: a stop signal arrived before training started. With ``resume`` on a finished run: its COMPLETED
    summary, marked ``already_completed`` (completed_run.py), and nothing is started or written."""
    from megatron_sft import stop_signal
    from megatron_sft.launch import local_worker_count, run_local_workers
    from megatron_sft.parallel import under_launcher
    from megatron_sft.train.completed_run import agreed_completed_summary
    from megatron_sft.train.preflight import preflight
    from megatron_sft.train.run_lock import HELD_ENV, RunLock
    from megatron_sft.train.step import NonFiniteError

    workers = local_worker_count(nproc)
    completed = agreed_completed_summary(config, resume, collective=workers is None and under_launcher())
    if completed is not None:
        return completed
    preflight(config, workers, resume)
    if stop_signal.received() is not None:
        return None
    if workers is None:
        return train_worker(config.to_dict(), resume)
    lock = RunLock(config.output_dir).acquire()
    os.environ[HELD_ENV] = str(config.output_dir)
    try:
        return run_local_workers(train_worker, workers, config.to_dict(), resume, timeout_s=7 * 24 * 3600,
                                 expected_errors=user_errors() + (NonFiniteError,), catch_stop_signals=True)[0]
    finally:
        os.environ.pop(HELD_ENV, None)
        lock.release()
