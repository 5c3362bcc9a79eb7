"""The generations file: one JSON line per item (prompt, reference, n graded samples), appended as items finish.

A run that stops part-way leaves whole lines and at most one torn last line; reading drops the torn line (it is
regenerated) and says so. Re-grading rewrites the file through a temporary file and a rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def read_records(path: Path) -> dict[str, dict]:
    """Records by item id; a torn last line (a crash mid-write) is cut off the file."""
    if not path.is_file():
        return {}
    records: dict[str, dict] = {}
    data = path.read_bytes()
    good_end = 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            record = json.loads(line)
        except ValueError:
            if good_end + len(line) < len(data):
                raise ValueError(f"{path}: line at byte {good_end} is not JSON; the file is damaged, move it away "
                                 "to regenerate that benchmark") from None
            print(f"{path}: dropping a torn last line (an interrupted write); its item is generated again")
            with open(path, "r+b") as f:
                f.truncate(good_end)
            break
        records[record["id"]] = record
        good_end += len(line)
    return records


def append_records(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def rewrite_records(path: Path, records: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
