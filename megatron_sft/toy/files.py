"""The working directory and JSONL rows that the demo and the continuum write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fresh_output_dir(out: str | Path, overwrite: bool) -> Path:
    """An empty OUT with OUT/data/; an existing OUT is replaced only with ``overwrite``."""
    import shutil

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out")
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    return out
