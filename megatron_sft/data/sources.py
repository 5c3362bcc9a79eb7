"""Read training rows from jsonl, parquet or a saved HF ``datasets`` directory, keeping file and row numbers.

Every row carries where it came from, so that a bad row can be reported as ``FILE:ROW`` (1-based; for
jsonl the line number) with what to do about it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

BadLines = Literal["raise", "yield"]  # a line that cannot be decoded: raise DataError, or yield it marked


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class Row:
    source: str  # file (or dataset directory) the row came from
    number: int  # 1-based row number within it (the line number for jsonl)
    record: dict[str, Any]
    error: Optional[str] = None  # why the line could not be read (only with bad_lines="yield"); record is {}

    @property
    def where(self) -> str:
        return f"{self.source}:{self.number}"


def _decode_line(raw: bytes) -> tuple[Any, Optional[str]]:
    """(the JSON object of one jsonl line, None) or (None, why it is not one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8; byte 0x{raw[err.start]:02x} at column {err.start + 1}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON; {err.msg} at column {err.colno}"
    if not isinstance(record, dict):
        return None, f"expected a JSON object per line, got {type(record).__name__}"
    return record, None


def _jsonl_rows(path: Path, bad_lines: BadLines = "raise") -> Iterator[Row]:
    """Rows of a jsonl file, read as bytes so that an undecodable line is reported (or yielded) as FILE:LINE."""
    rows = 0
    with path.open("rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows += 1
            record, error = _decode_line(line)
            if error is None:
                yield Row(str(path), line_number, record)
            elif bad_lines == "yield":
                yield Row(str(path), line_number, {}, error)
            else:
                raise DataError(f"{path}:{line_number}: {error}")
    if rows == 0:
        raise DataError(f"{path}: the file holds no rows (it is empty); remove it from data.train / data.eval or fill it")


def _starts_with_array(path: Path) -> bool:
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith(b"[")
    return False


def _json_array_rows(path: Path) -> Iterator[Row]:
    """A .json file holding one array of objects (as many datasets are published); rows numbered from 1."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected an array of JSON objects, item {number} is {type(record).__name__}")
        yield Row(str(path), number, record)


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield Row(str(path), number, record)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({str(err).splitlines()[0][:200]}); "
                        "rewrite it or remove it from the data") from None
    if number == 0:
        raise DataError(f"{path}: the parquet file holds no rows; remove it from data.train / data.eval or fill it")


def _dataset_dir_rows(path: Path) -> Iterator[Row]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # DatasetDict: take the train split
        if "train" not in dataset:
            raise DataError(f"{path}: dataset has splits {list(dataset.keys())} but no 'train'; point at one split")
        dataset = dataset["train"]
    for number, record in enumerate(dataset, start=1):
        yield Row(str(path), number, dict(record))


def read_rows(path: str | Path, bad_lines: BadLines = "raise") -> Iterator[Row]:
    """Rows of one file or directory (a directory is a saved HF dataset, or holds *.jsonl / *.parquet files).
    ``bad_lines="yield"``: a jsonl line that is not UTF-8 JSON comes as a Row with ``error`` set (to be skipped
    and counted by the caller) instead of raising."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            yield from _dataset_dir_rows(path)
            return
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DataError(f"{path}: directory has no *.jsonl / *.parquet files and is not a saved HF dataset")
        for file in files:
            yield from read_rows(file, bad_lines)
        return
    if path.suffix == ".json" and _starts_with_array(path):
        yield from _json_array_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path, bad_lines)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .parquet or a saved HF dataset")


def field(row: Row, key: str) -> Any:
    """``row.record[key]``, where ``key`` may be a dotted path into nested dicts (``extra_info.question``)."""
    value: Any = row.record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            available = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"{row.where}: no field {key!r} (at {part!r}; available: {available})")
        value = value[part]
    return value
