"""Cut a run's logs back to the step a resume starts from, so that every step is logged once.

After a kill, ``metrics.jsonl`` (and TensorBoard) held the steps since the last checkpoint, and the resumed
run logged them again. The jsonl file is rewritten atomically without them (a line torn by the kill goes
too); for TensorBoard the writer is opened with ``purge_step``, TensorBoard's own way of hiding the later
events of an earlier session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def cut_metrics_back(path: Path, step: int) -> int:
    """Keep the records of steps <= ``step``; returns how many lines were removed."""
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False  # torn by a kill mid-write
        if keep:
            kept.append(line)
        else:
            removed += 1
    if removed:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return removed
