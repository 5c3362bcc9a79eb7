"""Raw rows of a source data set: a Hugging Face hub id (online) or local files (offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from megatron_sft.data.sources import DataError, Row, read_rows


def looks_local(source: str) -> bool:
    return Path(source).exists() or source.startswith((".", "/", "~")) or Path(source).suffix in (".jsonl", ".json", ".parquet")


def raw_rows(source: str, hub_config: Optional[str] = None, split: str = "train", hint: str = "") -> Iterator[Row]:
    """Rows of local jsonl / json / parquet files (or a saved dataset), else of the hub dataset ``source``."""
    if looks_local(source):
        yield from read_rows(Path(source).expanduser())
        return
    try:
        from datasets import load_dataset

        dataset = load_dataset(source, hub_config, split=split)
    except Exception as err:  # offline, unknown id, gated: all need the same advice
        raise DataError(f"could not load {source}{f' ({hub_config})' if hub_config else ''} from the Hugging Face hub: "
                        f"{type(err).__name__}: {err}. Download it where there is internet and pass the files "
                        f"{hint or 'with --source PATH'}") from None
    where = f"{source}{f'/{hub_config}' if hub_config else ''}[{split}]"
    for number, record in enumerate(dataset, start=1):
        yield Row(where, number, dict(record))
