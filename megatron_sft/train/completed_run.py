"""``--resume`` of a run that already finished: report it and leave its files alone.

Resuming a finished run used to load the last checkpoint, take no step, export again and rewrite
``OUTPUT/COMPLETED`` with ``first_loss/last_loss: null``, losing the run's summary. Now the launcher reads
``COMPLETED`` first and hands its summary back (marked :data:`ALREADY_COMPLETED`) without starting anything,
unless the config asks for more steps than were taken (a larger ``train.epochs`` or ``train.max_steps``):
then the trainer continues the run as before. Under torchrun/Slurm every rank takes rank 0's decision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_sft.config import Config

ALREADY_COMPLETED = "already_completed"  # key set in the summary that launch_training returns for such a run


def _saved_train_section(out: Path) -> dict[str, Any]:
    """The ``train`` section of the config the finished run last ran with (empty when unreadable)."""
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    section = saved.get("train") if isinstance(saved, dict) else None
    return section if isinstance(section, dict) else {}


def asks_for_more_steps(config: Config, saved_train: dict[str, Any], steps_done: int) -> bool:
    """Whether the config extends the finished run: more epochs, a ``max_steps`` above the steps taken, or a
    ``max_steps`` that cut the run lifted."""
    t = config.train
    if t.max_steps is not None:
        return t.max_steps > steps_done
    if t.epochs > saved_train.get("epochs", t.epochs):
        return True
    return saved_train.get("max_steps") is not None and saved_train["max_steps"] <= steps_done


def completed_summary(config: Config, resume: bool) -> Optional[dict[str, Any]]:
    """This rank's view: the COMPLETED summary (plus ``already_completed: OUTPUT/COMPLETED``) when --resume
    finds the run finished and the config asks for no more steps; else None (the trainer takes over)."""
    from megatron_sft.train.trainer import COMPLETED_MARKER

    out = Path(config.output_dir)
    marker = out / COMPLETED_MARKER
    if not resume or not marker.is_file():
        return None
    try:
        summary = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None  # unreadable: let the trainer resume, which rewrites it
    if not isinstance(summary, dict) or summary.get("stopped_by_signal"):
        return None
    if asks_for_more_steps(config, _saved_train_section(out), int(summary.get("steps") or 0)):
        return None
    return {**summary, ALREADY_COMPLETED: str(marker)}


def agreed_completed_summary(config: Config, resume: bool, collective: bool) -> Optional[dict[str, Any]]:
    """:func:`completed_summary`, the same on every rank: with ``collective`` (torchrun/Slurm ranks, and only
    with --resume) rank 0's view is broadcast over the job's process group, which is kept for the trainer
    when it goes on and closed when the run is already complete."""
    if not (collective and resume):
        return completed_summary(config, resume)
    import torch.distributed as dist

    from megatron_sft.parallel import init_distributed

    rank, _ = init_distributed()
    box = [completed_summary(config, resume) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        dist.destroy_process_group()
    return box[0]


def completed_message(summary: dict[str, Any]) -> str:
    """The one line that ``megatron-sft train --resume`` prints for a finished run."""
    marker = Path(summary[ALREADY_COMPLETED])

    def number(key: str) -> str:
        value = summary.get(key)
        return "?" if value is None else f"{value:.4f}"

    model = f", model in {summary['export']}" if summary.get("export") else ""
    return (f"megatron-sft train: {marker.parent} has already completed ({summary.get('steps')} steps, loss "
            f"{number('first_loss')} -> {number('last_loss')}{model}; see {marker}); nothing to do. To train "
            "further, resume with a larger train.max_steps or train.epochs; to train again, choose another output_dir")
