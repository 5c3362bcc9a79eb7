"""`megatron-sft prepare`: every training set from local files in its published layout (no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sft.data.sources import DataError
from megatron_sft.prepare.build import prepare
from megatron_sft.prepare.datasets import MURI_LANGUAGES


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def numina_rows(n: int) -> list[dict]:
    """NuminaMath-CoT's columns: source, problem, solution, messages."""
    return [{"source": "synthetic_math", "problem": f"What is {i} + {i}?", "solution": f"{i} + {i} = \\boxed{{{2 * i}}}",
             "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(n)]


def test_math_from_a_numina_parquet_holds_out_val_and_keeps_every_row(tmp_path):
    import datasets

    datasets.Dataset.from_list(numina_rows(30)).to_parquet(str(tmp_path / "numina.parquet"))
    report = prepare("math", tmp_path / "out", [str(tmp_path / "numina.parquet")], val_size=5, seed=1)
    train, val = read_jsonl(tmp_path / "out" / "train.jsonl"), read_jsonl(tmp_path / "out" / "val.jsonl")
    assert (report.train_rows, report.val_rows) == (25, 5) and (len(train), len(val)) == (25, 5)
    assert sorted(r["prompt"] for r in train + val) == sorted(r["problem"] for r in numina_rows(30))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    first = next(r for r in train + val if r["prompt"] == "What is 3 + 3?")
    assert first["response"] == "3 + 3 = \\boxed{6}" and first["origin"].endswith("numina.parquet:4")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["read_rows"] == {"numina": 30} and manifest["skipped"] == []
    with pytest.raises(DataError, match="train.jsonl exists; pass --overwrite"):
        prepare("math", tmp_path / "out", [str(tmp_path / "numina.parquet")], val_size=5)


def test_reference_layout_nested_fields_and_explicit_fields(tmp_path):
    rows = [{"extra_info": {"question": f"q{i}", "answer": f"a{i}"}} for i in range(6)]
    write_jsonl(tmp_path / "ref.jsonl", rows)
    prepare("math", tmp_path / "a", [f"numina={tmp_path / 'ref.jsonl'}"], val_size=1)
    kept = read_jsonl(tmp_path / "a" / "train.jsonl") + read_jsonl(tmp_path / "a" / "val.jsonl")
    assert sorted((r["prompt"], r["response"]) for r in kept) == sorted((f"q{i}", f"a{i}") for i in range(6))

    odd = [{"Frage": f"q{i}", "Antwort": f"a{i}"} for i in range(4)]
    write_jsonl(tmp_path / "odd.jsonl", odd)
    with pytest.raises(DataError, match=r"odd.jsonl:1: none of the field pairs .*fields: \['Antwort', 'Frage'\].*--prompt-field"):
        prepare("medical", tmp_path / "b", [str(tmp_path / "odd.jsonl")], val_size=1)
    prepare("medical", tmp_path / "b", [str(tmp_path / "odd.jsonl")], val_size=1, prompt_field="Frage",
            response_field="Antwort")
    pairs = {(r["prompt"], r["response"]) for r in read_jsonl(tmp_path / "b" / "train.jsonl")}
    assert pairs <= {(f"q{i}", f"a{i}") for i in range(4)} and len(pairs) == 3


def test_bad_rows_fail_with_file_and_row_or_are_skipped_and_listed(tmp_path):
    rows = numina_rows(8)
    rows[2]["solution"] = "   "
    rows[5]["problem"] = None
    write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(DataError, match=r"raw.jsonl:3: empty or non-text response .*--on-bad-row skip"):
        prepare("math", tmp_path / "out", [str(tmp_path / "raw.jsonl")], val_size=2)
    report = prepare("math", tmp_path / "out", [str(tmp_path / "raw.jsonl")], val_size=2, on_bad_row="skip")
    assert report.train_rows + report.val_rows == 6 and len(report.skipped) == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s.split(": ")[0].rsplit("/", 1)[-1] for s in manifest["skipped"]] == ["raw.jsonl:3", "raw.jsonl:6"]
    assert "skipped 2 bad rows" in report.summary()


def test_instruction_tuning_merges_magpie_conversations_and_a_wizardlm_json_array(tmp_path):
    magpie = [{"conversations": [{"from": "human", "value": f"ask {i}"}, {"from": "gpt", "value": f"reply {i}"}]}
              for i in range(5)]
    magpie.append({"conversations": [{"from": "gpt", "value": "no question"}]})
    write_jsonl(tmp_path / "magpie.jsonl", magpie)
    (tmp_path / "wizard.json").write_text(json.dumps([{"instruction": f"do {i}", "output": f"done {i}"} for i in range(4)]))
    sources = [f"magpie={tmp_path / 'magpie.jsonl'}", f"wizardlm={tmp_path / 'wizard.json'}"]
    with pytest.raises(DataError, match="magpie.jsonl:6: conversations must start with a human turn"):
        prepare("instruction_tuning", tmp_path / "out", sources, val_size=2)
    report = prepare("instruction_tuning", tmp_path / "out", sources, val_size=2, on_bad_row="skip")
    assert report.read_rows == {"magpie": 6, "wizardlm": 4} and report.train_rows + report.val_rows == 9
    rows = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(tmp_path / "out" / "val.jsonl")
    assert {r["source"] for r in rows} == {"magpie", "wizardlm"}
    assert ("do 2", "done 2") in {(r["prompt"], r["response"]) for r in rows}
    with pytest.raises(DataError, match="several sources \\(magpie, wizardlm\\); write --source NAME=PATH"):
        prepare("instruction_tuning", tmp_path / "x", [str(tmp_path / "magpie.jsonl")])
    with pytest.raises(DataError, match="has no source 'alpaca'"):
        prepare("instruction_tuning", tmp_path / "x", [f"alpaca={tmp_path / 'magpie.jsonl'}"])


def test_muri_languages_and_magicoder_from_local_files(tmp_path):
    sources = []
    for lang in MURI_LANGUAGES:
        write_jsonl(tmp_path / f"{lang}.jsonl", [{"input": f"{lang} in {i}", "output": f"{lang} out {i}"} for i in range(3)])
        sources.append(f"{lang}={tmp_path / f'{lang}.jsonl'}")
    report = prepare("low_resource_language", tmp_path / "muri", sources, val_size=3, limit=2)
    assert report.read_rows == {lang: 2 for lang in MURI_LANGUAGES} and report.train_rows == 2 * 7 - 3
    write_jsonl(tmp_path / "magicoder.jsonl", [{"lang": "python", "problem": "p", "solution": "s", "seed": "x"}] * 3)
    assert prepare("coder", tmp_path / "code", [str(tmp_path / "magicoder.jsonl")], val_size=1).train_rows == 2


def test_figfont_is_generated_deterministically_and_its_answers_score_one(tmp_path):
    import reasoning_gym

    a = prepare("figfont", tmp_path / "a", size=20, val_size=4, seed=7)
    prepare("figfont", tmp_path / "b", size=20, val_size=4, seed=7)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    assert (a.train_rows, a.val_rows) == (20, 4)
    rows = read_jsonl(tmp_path / "a" / "train.jsonl")
    generated = reasoning_gym.create_dataset("figlet_font", seed=7, size=24)
    by_question = {entry["question"]: entry for entry in generated}
    for row in rows:
        entry = by_question[row["prompt"]]
        assert generated.score_answer(row["response"], entry) == 1.0
        assert generated.score_answer(row["response"] + "X", entry) < 1.0
    with pytest.raises(DataError, match="generated by reasoning-gym; it takes --size and --seed, not --source"):
        prepare("figfont", tmp_path / "c", ["x.jsonl"])


def test_prepared_rows_load_in_the_trainer_and_the_cli_reports(tmp_path):
    from transformers import AutoTokenizer

    from megatron_sft.toy.tiny_models import save_tiny_tokenizer
    from megatron_sft.data.batches import load_rows
    from megatron_sft.config import DataConfig

    write_jsonl(tmp_path / "raw.jsonl", numina_rows(12))
    done = subprocess.run([sys.executable, "-m", "megatron_sft", "prepare", "math", "--out", str(tmp_path / "data"),
                           "--source", str(tmp_path / "raw.jsonl"), "--val-size", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(10 rows) and val.jsonl (2 rows); read: numina 12; skipped 0 bad rows" in done.stdout
    save_tiny_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    rows = load_rows([str(tmp_path / "data" / "train.jsonl")], DataConfig(packing=False, max_length=64), tokenizer)
    assert rows.sequences == 10 and all(sum(r.target_mask) > 0 for r in rows.rows)
    bad = subprocess.run([sys.executable, "-m", "megatron_sft", "prepare", "math", "--out", str(tmp_path / "data"),
                          "--source", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.jsonl exists" in bad.stdout
