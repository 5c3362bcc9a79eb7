"""Multilingual multiple choice in the MMLU-ProX layout, for the low-resource extension's languages.

The low-resource recipe trains on MURI-IT in mar, tel, nep, swa, wol, yor, zul (ISO 639-3); MMLU-ProX
(li-lab/MMLU-ProX, 29 languages, ~11.8k questions each, up to ten options) has all seven under their ISO 639-1
codes (mr, te, ne, sw, wo, yo, zu). One benchmark per language (``mmlu_prox_mar`` ...), graded by the letter
grader like the medical sets; the domain ``multilingual`` averages them.

Files (under ``DATA_DIR/mmlu_prox/``, either code): ``CODE.jsonl[.gz]`` or ``CODE.parquet`` or the hub's
per-language folder ``CODE/test*.parquet`` / ``CODE/test/*.parquet``. Rows: ``question``, the options as
``option_0`` .. ``option_9`` (MMLU-ProX) or an ``options`` list (MMLU-Pro), ``answer`` (the letter) and, when
present, ``answer_index`` (checked against the letter) and ``question_id``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

from megatron_sft.evaluation import benchmarks as bm

# MURI-IT / recipe code (ISO 639-3) -> MMLU-ProX config (ISO 639-1), language name
LANGUAGES: dict[str, tuple[str, str]] = {
    "mar": ("mr", "Marathi"), "tel": ("te", "Telugu"), "nep": ("ne", "Nepali"), "swa": ("sw", "Swahili"),
    "wol": ("wo", "Wolof"), "yor": ("yo", "Yoruba"), "zul": ("zu", "Zulu"),
}
FOLDER = "mmlu_prox"
LETTERS = "ABCDEFGHIJKLMNOP"
PATTERNS = ("{code}.jsonl", "{code}.jsonl.gz", "{code}.parquet", "{code}/test*.parquet", "{code}/test/*.parquet",
            "{code}/test*.jsonl")


def language_of(bench: bm.Benchmark) -> str:
    """``mmlu_prox_swa`` -> ``swa``."""
    return bench.name.rsplit("_", 1)[-1]


def language_files(data_dir: Path, language: str) -> list[Path]:
    """The test files of one language (several parquet shards are read in order); none: a BenchmarkError
    naming what was looked for and where the files come from."""
    iso1 = LANGUAGES[language][0]
    folder = data_dir / FOLDER
    for pattern in PATTERNS:
        for code in (iso1, language):
            found = sorted(p for p in folder.glob(pattern.format(code=code)) if p.is_file())
            if found:
                return found
    raise bm.BenchmarkError(
        f"{folder}: no MMLU-ProX test file for {LANGUAGES[language][1]} ({language}); looked for "
        f"{', '.join(p.format(code=iso1) for p in PATTERNS)} (or {language} instead of {iso1}). Get the {iso1} "
        f"test split of li-lab/MMLU-ProX (see the README's Evaluation section) and put it there, or point "
        "--data-dir elsewhere")


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) per row: FILE:LINE for jsonl (a line that is not JSON fails naming it), FILE row N for
    parquet."""
    if path.suffix == ".parquet":
        import pandas as pd

        for number, row in enumerate(pd.read_parquet(path).to_dict(orient="records"), start=1):
            yield f"{path} row {number}", row
        return
    import gzip
    import json

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise bm.BenchmarkError(f"{path}:{number}: not JSON ({err.msg}); fix or re-download the file") from None


def _present(value: Any) -> bool:
    """Parquet stores a missing option as None (or NaN once pandas has touched it)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value).strip() != ""


def row_options(row: dict, where: str) -> dict[str, str]:
    """Letter -> text: from ``option_0..option_9`` (gaps keep their letters) or from an ``options`` list."""
    numbered = sorted((int(k.split("_")[1]), v) for k, v in row.items()
                      if k.startswith("option_") and k.split("_")[1].isdigit())
    if numbered:
        return {LETTERS[i]: str(v).strip() for i, v in numbered if _present(v)}
    listed = bm._literal(row.get("options"))
    if listed is None or isinstance(listed, str):
        raise bm.BenchmarkError(f"{where}: no options (expected option_0 .. option_9 or an options list)")
    if isinstance(listed, dict):
        return {str(k).strip(): str(v).strip() for k, v in listed.items() if _present(v)}
    return {LETTERS[i]: str(v).strip() for i, v in enumerate(listed) if _present(v)}


def row_item(row: Any, where: str, fallback_id: str) -> bm.Item:
    """One MMLU-ProX row -> an Item for the letter grader; anything malformed fails naming ``where``."""
    if not isinstance(row, dict):
        raise bm.BenchmarkError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = bm._require(row, "question", where)
    options = row_options(row, where)
    answer = str(bm._require(row, "answer", where)).strip().upper()
    index = row.get("answer_index")
    if _present(index) and str(index).strip().lstrip("-").isdigit():
        expected = LETTERS[int(index)] if 0 <= int(index) < len(LETTERS) else None
        if expected != answer:
            raise bm.BenchmarkError(f"{where}: answer {answer!r} disagrees with answer_index {index} "
                                    f"(= {expected!r})")
    item_id = str(row["question_id"]) if _present(row.get("question_id")) else fallback_id
    return bm._choice_item(item_id, str(question), options, answer, where)


def load_mmlu_prox(bench: bm.Benchmark, data_dir: Path, options: dict) -> list[bm.Item]:
    """The items of one language, in file order."""
    items: list[bm.Item] = []
    for path in language_files(data_dir, language_of(bench)):
        for where, row in _rows(path):
            items.append(row_item(row, where, str(len(items))))
    if not items:
        raise bm.BenchmarkError(f"{bench.name}: the MMLU-ProX files of {language_of(bench)} hold no rows")
    return items
