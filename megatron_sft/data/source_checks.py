"""Cheap checks that a data path can give rows, run by the launcher before any worker starts.

Without them an empty jsonl, a corrupt parquet or a directory without data files failed inside every
worker, as tracebacks. Only headers and the first non-blank bytes are read; row-level problems are still
found (by FILE:LINE) when the rows are read.
"""

from __future__ import annotations

from pathlib import Path

from megatron_sft.data.sources import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _has_content(path: Path) -> bool:
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _check_parquet(path: Path, key: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path} ({key}): not a readable parquet file ({str(err).splitlines()[0][:200]}); "
                        "rewrite it or remove it from the list") from None
    if rows == 0:
        raise DataError(f"{path} ({key}): the parquet file holds no rows; fill it or remove it from the list")


def check_data_source(path: str | Path, key: str) -> None:
    """``path`` (listed under config key ``key``) exists and can hold rows; raises :class:`DataError`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} ({key}): no such file or directory; fix the path in {key}")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{path} ({key}): directory has no *.jsonl / *.parquet files and is not a saved HF "
                            "dataset; point at the data files")
        for file in files:
            check_data_source(file, key)
        return
    if path.suffix == ".parquet":
        _check_parquet(path, key)
    elif path.suffix in (".jsonl", ".json"):
        if not _has_content(path):
            raise DataError(f"{path} ({key}): the file holds no rows (it is empty); fill it or remove it from the list")
    else:
        raise DataError(f"{path} ({key}): unsupported file type {path.suffix!r}; use .jsonl, .parquet or a saved HF dataset")
