"""SFT data: readers with file:row errors, response-only loss masks, bad-row policy, truncation, packing."""

from __future__ import annotations

import json

import pytest

from megatron_sft.config import DataConfig
from megatron_sft.data.formatting import Formatter, tokenize_rows
from megatron_sft.data.packing import pack_examples, single_rows
from megatron_sft.data.sources import DataError, read_rows
from megatron_sft.toy.tiny_models import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trained_text(tokenizer, example):
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.target_mask) if m])


def test_jsonl_parquet_and_dataset_dir_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    records = [{"extra_info": {"question": f"{i} + 1 ?", "answer": f"{i + 1}"}} for i in range(5)]
    jsonl = _write_jsonl(tmp_path / "train.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "train.parquet")
    Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    for path in (jsonl, tmp_path / "train.parquet", tmp_path / "ds"):
        rows = list(read_rows(path))
        assert [r.record for r in rows] == records and [r.number for r in rows] == [1, 2, 3, 4, 5]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1", "response": "2"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_rows(path))


def test_prompt_response_trains_on_response_and_eos_only(tokenizer, tmp_path):
    rows = read_rows(_write_jsonl(tmp_path / "t.jsonl", [{"extra_info": {"question": "2 + 3 ?", "answer": "5 ."}}]))
    config = DataConfig(prompt_key="extra_info.question", response_key="extra_info.answer")
    (example,), _ = tokenize_rows(rows, Formatter(tokenizer, config))
    assert _trained_text(tokenizer, example) == "5 . <|end|>"
    untrained = tokenizer.decode([t for t, m in zip(example.input_ids, example.target_mask) if not m])
    assert untrained == "<|user|> 2 + 3 ? <|end|> <|assistant|>"


def test_plain_template(tokenizer, tmp_path):
    rows = read_rows(_write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a b", "response": "c"}]))
    (example,), _ = tokenize_rows(rows, Formatter(tokenizer, DataConfig(template="plain", plain_template="q : {prompt} =")))
    assert tokenizer.decode(example.input_ids) == "q : a b = c <|end|>" and _trained_text(tokenizer, example) == "c <|end|>"


def test_chat_messages_train_on_every_assistant_turn(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "x"}, {"role": "user", "content": "1 + 1 ?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2 + 2 ?"}, {"role": "assistant", "content": "4 ."},
    ]
    rows = read_rows(_write_jsonl(tmp_path / "t.jsonl", [{"messages": messages}]))
    (example,), _ = tokenize_rows(rows, Formatter(tokenizer, DataConfig()))
    assert _trained_text(tokenizer, example) == "2 <|end|> 4 . <|end|>"


def test_bad_rows_error_with_location_or_are_skipped_and_counted(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "1", "response": "2"}, {"prompt": "1"}, {"prompt": "3", "response": ""}, {"prompt": "4", "response": "5"},
    ])
    formatter = Formatter(tokenizer, DataConfig())
    with pytest.raises(DataError, match=r"t.jsonl:2: no field 'response'.*data.on_bad_row=skip"):
        tokenize_rows(read_rows(path), formatter)
    examples, report = tokenize_rows(read_rows(path), formatter, on_bad_row="skip")
    assert [e.where.rsplit(":", 1)[1] for e in examples] == ["1", "4"]
    assert report.rows == 4 and report.kept == 2 and sum(report.skipped.values()) == 2
    assert any("t.jsonl:3" in message for message in report.first_skipped)


def test_truncation_policies(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "1", "response": " ".join(["7"] * 20)}])
    (cut,), report = tokenize_rows(read_rows(path), Formatter(tokenizer, DataConfig(max_length=10)))
    assert len(cut) == 10 and report.truncated == 1 and cut.truncated and sum(cut.target_mask) > 0
    # a row that fits max_length exactly (4 prompt + 20 response + eos) is not counted as truncated
    (fits,), report = tokenize_rows(read_rows(path), Formatter(tokenizer, DataConfig(max_length=25)))
    assert len(fits) == 25 and report.truncated == 0 and not fits.truncated
    with pytest.raises(DataError, match="no usable rows"):
        tokenize_rows(read_rows(path), Formatter(tokenizer, DataConfig(max_length=10, truncation="drop")), "skip")
    with pytest.raises(DataError, match="prompt alone fills data.max_length=3"):
        tokenize_rows(read_rows(path), Formatter(tokenizer, DataConfig(max_length=3)))


def test_packing_keeps_every_example_once_with_reset_positions(tokenizer, tmp_path):
    records = [{"prompt": "1 " * (i % 7 + 1), "response": "2 " * (i % 5 + 1)} for i in range(40)]
    examples, _ = tokenize_rows(read_rows(_write_jsonl(tmp_path / "t.jsonl", records)), Formatter(tokenizer, DataConfig()))
    packed = pack_examples(examples, max_length=32)
    assert sorted(s for row in packed for s in row.sources) == sorted(e.where for e in examples)
    assert all(len(row) <= 32 for row in packed) and len(packed) < len(examples)
    total_tokens = sum(len(e) for e in examples)
    assert sum(len(r) for r in packed) == total_tokens
    by_source = {e.where: e for e in examples}
    for row in packed:
        start = 0
        for seq, source in enumerate(row.sources):
            example = by_source[source]
            end = start + len(example)
            assert row.input_ids[start:end] == example.input_ids and row.target_mask[start:end] == example.target_mask
            assert row.position_ids[start:end] == list(range(len(example))) and set(row.sequence_ids[start:end]) == {seq}
            start = end
    assert pack_examples(examples, 32)[0].sources == packed[0].sources  # deterministic
    assert [len(r.sources) for r in single_rows(examples)] == [1] * len(examples)


def test_sampler_is_deterministic_sharded_and_resumable():
    from megatron_sft.data.sampler import ShardedSampler

    ranks = [ShardedSampler(num_rows=10, global_batch=4, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    steps = [[s.next_step() for _ in range(6)] for s in ranks]  # 3 steps per epoch, 2 epochs
    assert ranks[0].steps_per_epoch == 3 and ranks[0].repeated_per_epoch == 2
    for epoch in (0, 1):
        seen = [row for r in range(2) for (e, _, rows) in steps[r] if e == epoch for row in rows]
        assert len(seen) == 12 and set(seen) == set(range(10))  # every row, 2 repeated to fill the last step
    assert steps[0][0][2] != steps[0][3][2]  # a new order each epoch
    resumed = ShardedSampler(10, 4, 0, 2, seed=3)
    resumed.load_state_dict({**ranks[0].state_dict(), "epoch": 0, "step": 2})
    assert [resumed.next_step() for _ in range(4)] == steps[0][2:]
    with pytest.raises(ValueError, match="global_batch=4 but this run has 8"):
        ShardedSampler(10, 8, 0, 2, seed=3).load_state_dict(ranks[0].state_dict())


def test_collate_shifts_labels_and_never_crosses_sequence_boundaries():
    import torch

    from megatron_sft.data.collate import IGNORE_INDEX, collate
    from megatron_sft.data.formatting import Example

    a = Example([10, 11, 12], [0, 1, 1], "a")
    b = Example([20, 21], [1, 1], "b")  # trains on its first token: must not be predicted from a's last
    (row,) = pack_examples([a, b], max_length=8)
    batch = collate([row], pad_id=0, pad_to_multiple=4)
    assert batch["tokens"].shape == (1, 8)
    assert batch["labels"][0].tolist() == [11, 12, IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["loss_mask"][0].tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert batch["position_ids"][0].tolist()[:5] == [0, 1, 2, 0, 1]
    assert batch["sequence_ids"][0].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert torch.equal(batch["labels"] != IGNORE_INDEX, batch["loss_mask"].bool())
