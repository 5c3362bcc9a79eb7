"""Disk space around a checkpoint save: check before, explain and clean up after a failed write.

A full disk during a save surfaced as torch's "unexpected pos 704 vs 598" from every rank while the partial
``.step_N.tmp`` folder kept holding the space. Here a save is refused up front when the previous checkpoint's
size does not fit, and a write that fails is reported as one line ("no space left on PATH (needs about X GiB,
Y free)"), its partial folder removed; ``latest`` is untouched, so ``--resume`` continues from it.
Left-overs of a killed save are removed at start-up (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from megatron_sft.train.checkpoint_integrity import MANIFEST_FILE

_GIB = 1 << 30
_NEARLY_FULL = 64 << 20  # after a failed write, less than this free means the disk filled up
_MARGIN = 1.05


class NoSpaceError(RuntimeError):
    """A checkpoint does not fit on its filesystem."""


def checkpoint_bytes(checkpoint: Optional[Path]) -> Optional[int]:
    """Size of a written checkpoint (from its manifest, else by walking it); None when there is none."""
    if checkpoint is None or not checkpoint.is_dir():
        return None
    manifest = checkpoint / MANIFEST_FILE
    try:
        return sum(entry["size"] for entry in json.loads(manifest.read_text())["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())


def _size(n: float) -> str:
    return f"{n / _GIB:.1f} GiB" if n >= _GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def _no_space_message(root: Path, needed: Optional[int], free: int) -> str:
    need = f"needs about {_size(needed)}, " if needed else ""
    return (f"no space left on {root} ({need}{_size(free)} free); free some space or move output_dir, "
            "then continue with --resume")


def check_free_space(root: Path, needed: Optional[int]) -> None:
    """Refuse a save that the previous checkpoint's size says will not fit."""
    if needed is None:
        return
    free = shutil.disk_usage(root).free
    if free < needed * _MARGIN:
        raise NoSpaceError(_no_space_message(root, needed, free))


def _mentions_no_space(err: BaseException) -> bool:
    seen: set[int] = set()
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "Disk quota exceeded" in str(current):
            return True
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        failures = getattr(current, "failures", None)  # torch.distributed.checkpoint.CheckpointException
        if isinstance(failures, dict):
            pending += [e for e in failures.values() if isinstance(e, BaseException)]
    return False


def guarded_write(write: Callable[[], None], tmp: Path, root: Path, needed: Optional[int]) -> None:
    """Run ``write`` (this rank's part of a save into ``tmp``); on failure remove ``tmp`` and raise
    :class:`NoSpaceError` when the disk is full (by errno, or by the free space left), else re-raise."""
    try:
        write()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - torch's CheckpointException is a BaseException; re-raised
        free = shutil.disk_usage(root).free  # measured before the partial folder is removed
        shutil.rmtree(tmp, ignore_errors=True)
        if _mentions_no_space(err) or free < _NEARLY_FULL:
            raise NoSpaceError(_no_space_message(root, needed, free)) from None
        raise


def remove_stale_temporaries(checkpoints_dir: Path) -> list[str]:
    """Remove ``.step_N.tmp`` folders of saves that never finished (the run lock guarantees no save is in
    progress). A ``.step_N.old`` whose replacement never landed is moved back. Returns what was removed."""
    if not checkpoints_dir.is_dir():
        return []
    removed = []
    for path in sorted(checkpoints_dir.iterdir()):
        if path.name.startswith(".step_") and path.name.endswith(".old"):
            final = checkpoints_dir / path.name[1:-len(".old")]
            if not final.exists():
                os.replace(path, final)
        elif path.name.startswith(".") and path.name.endswith(".tmp"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
