"""Multilingual multiple choice (MMLU-ProX layout) for the low-resource languages: the loader on a few rows per
language in each published form (jsonl with option_0..option_9, the hub's parquet folder, an options list),
malformed rows failing with FILE:LINE, the letter grader, and eval's per-language accuracy and mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sft.cli import main
from megatron_sft.evaluation.benchmarks import (
    BENCHMARKS,
    LOW_RESOURCE_LANGUAGES,
    BenchmarkError,
    load_items,
    resolve_benchmarks,
)
from megatron_sft.evaluation.graders import grade
from megatron_sft.evaluation.multilingual import LANGUAGES

ROWS = 3


def prox_row(lang: str, i: int) -> dict:
    """An MMLU-ProX row: ten option columns, the unused ones None, the answer letter and its index."""
    options = {f"option_{k}": (f"{lang} option {k} of {i}" if k < 4 + i else None) for k in range(10)}
    answer = 1 + i
    return {"question_id": 100 + i, "question": f"{lang} question {i}?", **options, "answer": "ABCDEFGHIJ"[answer],
            "answer_index": answer, "cot_content": "", "category": "biology", "src": "ori_mmlu-x"}


def write_prox(folder: Path) -> dict[str, Path]:
    """Per language: mar as a gzip-free jsonl under its ISO 639-3 code, swa as the hub's parquet folder, the
    others as jsonl under their ISO 639-1 codes; tel lists its options (the MMLU-Pro form)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for lang in LOW_RESOURCE_LANGUAGES:
        rows = [prox_row(lang, i) for i in range(ROWS)]
        if lang == "tel":
            rows = [{"question_id": r["question_id"], "question": r["question"], "answer": r["answer"],
                     "options": [r[f"option_{k}"] for k in range(10) if r[f"option_{k}"]]} for r in rows]
        iso1 = LANGUAGES[lang][0]
        if lang == "swa":
            path = folder / iso1 / "test-00000-of-00001.parquet"
            path.parent.mkdir()
            pd.DataFrame(rows).to_parquet(path)
        else:
            path = folder / f"{lang if lang == 'mar' else iso1}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        written[lang] = path
    return written


@pytest.fixture()
def data_dir(tmp_path):
    write_prox(tmp_path / "mmlu_prox")
    return tmp_path


def test_every_language_loads_in_each_layout(data_dir):
    assert [b.name for b in resolve_benchmarks("multilingual")] == [f"mmlu_prox_{lang}" for lang in LOW_RESOURCE_LANGUAGES]
    assert resolve_benchmarks("mmlu_prox") == resolve_benchmarks("multilingual")
    for lang in LOW_RESOURCE_LANGUAGES:
        items = load_items(BENCHMARKS[f"mmlu_prox_{lang}"], data_dir=data_dir)
        assert [item.id for item in items] == ["100", "101", "102"], lang
        for i, item in enumerate(items):
            assert item.reference == "ABCDEFGHIJ"[1 + i]
            assert list(item.meta["options"]) == list("ABCDEFGHIJ"[:4 + i])  # the None columns are no options
            assert item.meta["options"]["A"] == f"{lang} option 0 of {i}"
            assert item.question.startswith(f"{lang} question {i}?") and f"B. {lang} option 1 of {i}" in item.question


def test_letter_grader_on_the_items(data_dir):
    item = load_items(BENCHMARKS["mmlu_prox_yor"], data_dir=data_dir)[2]  # answer D of A..F
    assert grade("choice", "Idahun ni \\boxed{D}", item.reference, item.meta)["score"] == 1.0
    assert grade("choice", "\\boxed{B}", item.reference, item.meta) == {"score": 0.0, "pred": "B"}
    assert grade("choice", "The answer is (D).", item.reference, item.meta)["score"] == 1.0
    assert grade("choice", "\\boxed{J}", item.reference, item.meta)["pred"] is None  # J is no option here
    assert grade("choice", "mo o mo", item.reference, item.meta)["error"] == "no option letter found"


@pytest.mark.parametrize("line, message", [
    ('{"question": "q?", "option_0": "a", ', ":2: not JSON"),
    (json.dumps({"question": "q?", "option_0": "a", "option_1": "b", "answer": "C"}),
     ":2: answer 'C' is not one of the options ['A', 'B']"),
    (json.dumps({"question": "q?", "option_0": "a", "option_1": "b", "answer": "B", "answer_index": 0}),
     ":2: answer 'B' disagrees with answer_index 0"),
    (json.dumps({"option_0": "a", "option_1": "b", "answer": "B"}), ":2: field 'question' is missing"),
    (json.dumps({"question": "q?", "answer": "A"}), ":2: no options"),
])
def test_a_malformed_row_fails_in_one_line_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "mmlu_prox" / "zu.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(prox_row("zul", 0)) + "\n" + line + "\n")
    with pytest.raises(BenchmarkError) as err:
        load_items(BENCHMARKS["mmlu_prox_zul"], data_dir=tmp_path)
    assert str(err.value).startswith(f"{path}{message}") and "\n" not in str(err.value)


def test_a_missing_language_names_the_files_and_the_source(tmp_path):
    with pytest.raises(BenchmarkError, match=r"no MMLU-ProX test file for Wolof \(wol\); looked for wo.jsonl.*"
                                             r"li-lab/MMLU-ProX"):
        load_items(BENCHMARKS["mmlu_prox_wol"], data_dir=tmp_path)


def test_eval_reports_each_language_and_their_mean(data_dir, tmp_path):
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    save_tiny_hf_model(tmp_path / "model", config_overrides={"max_position_embeddings": 4096})
    out = tmp_path / "run"
    assert main(["eval", "--model", str(tmp_path / "model"), "--benchmarks", "multilingual", "--out", str(out),
                 "--backend", "hf", "--data-dir", str(data_dir), "--limit", "2", "--max-tokens", "4",
                 "--grader-workers", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [f"mmlu_prox_{lang}" for lang in LOW_RESOURCE_LANGUAGES]
    assert list(results["benchmarks"]) == names
    # right answers written into the saved generations, re-graded: per-language accuracy and the mean follow
    for k, name in enumerate(names):
        path = out / name / "generations.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for r, record in enumerate(records):
            right = k % 2 == 0 or r == 0  # every other language all right, the rest half right
            record["samples"][0]["text"] = f"\\boxed{{{record['reference'] if right else 'A'}}}"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["eval", "--model", str(tmp_path / "model"), "--benchmarks", "multilingual", "--out", str(out),
                 "--backend", "hf", "--data-dir", str(data_dir), "--limit", "2", "--max-tokens", "4",
                 "--grader-workers", "1", "--regrade"]) == 0
    results = json.loads((out / "results.json").read_text())
    accuracy = {name: results["benchmarks"][name]["accuracy"] for name in names}
    assert accuracy == {name: 1.0 if k % 2 == 0 else 0.5 for k, name in enumerate(names)}
    assert results["domains"]["multilingual"]["accuracy"] == pytest.approx(sum(accuracy.values()) / len(names))
    header = (out / "results.md").read_text().splitlines()[0]
    assert header == "| run | " + " | ".join(f"ProX-{lang}" for lang in LOW_RESOURCE_LANGUAGES) + " | multilingual Avg. |"
