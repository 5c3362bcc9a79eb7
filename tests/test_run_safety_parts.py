"""The pieces behind issue 19, in one process and without training: run lock, manifests and fallback,
disk-space guard (simulated ENOSPC), data readers' errors, dropped-row limit, numeric config checks, layout
preflight, metrics cut-back."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import socket
from collections import Counter
from pathlib import Path

import pytest

from megatron_sft.data.sources import DataError, read_rows


# run lock ----------------------------------------------------------------------------------------------------


def _hold_lock_forever(directory: str, ready) -> None:
    from megatron_sft.train.run_lock import RunLock

    RunLock(directory).acquire()
    ready.set()
    signal.pause()


def test_run_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    from megatron_sft.train.run_lock import RunLock, RunLockedError

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock_forever, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {holder.pid} on host {socket.gethostname()}\\)"):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up by the holder: the kernel drops the lock
        holder.join()
    RunLock(tmp_path).acquire().release()


# checkpoint manifests ----------------------------------------------------------------------------------------


def _fake_checkpoint(root: Path, step: int) -> Path:
    from megatron_sft.train.checkpoint_integrity import write_manifest

    path = root / f"step_{step:07d}"
    (path / "model").mkdir(parents=True)
    (path / "model" / "shard.distcp").write_bytes(os.urandom(300_000))
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(path)
    return path


def test_manifest_catches_a_flipped_byte_and_a_truncated_file(tmp_path):
    from megatron_sft.train.checkpoint_integrity import MANIFEST_FILE, verify_checkpoint

    path = _fake_checkpoint(tmp_path, 2)
    assert set(json.loads((path / MANIFEST_FILE).read_text())["files"]) == {"model/shard.distcp", "trainer_state.json"}
    assert verify_checkpoint(path).status == "ok"
    shard = path / "model" / "shard.distcp"
    data = bytearray(shard.read_bytes())
    data[1234] ^= 1
    shard.write_bytes(data)
    assert verify_checkpoint(path, "size").status == "ok"  # same size: only the checksum sees it
    verdict = verify_checkpoint(path, "checksum")
    assert verdict.status == "damaged" and verdict.message.startswith(f"{shard}: checksum differs")
    shard.write_bytes(data[:1000])
    verdict = verify_checkpoint(path, "size")
    assert verdict.status == "damaged" and f"{shard}: 1000 bytes, the manifest says 300000" in verdict.message
    assert verify_checkpoint(path, "none").status == "skipped"
    (path / MANIFEST_FILE).unlink()
    assert verify_checkpoint(path).status == "unverified"


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    from megatron_sft.train.checkpoint_integrity import CheckpointDamagedError, MANIFEST_FILE, choose_resume_checkpoint

    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "step_0000006" / "model" / "shard.distcp").write_bytes(b"short")
    said: list[str] = []
    chosen = choose_resume_checkpoint(tmp_path, "step_0000006", "checksum", "trainer_state.json", said.append)
    assert chosen.name == "step_0000004"
    assert said[0].startswith("checkpoint step_0000006 is damaged: ") and "shard.distcp" in said[0]
    assert said[1] == ("resuming from step_0000004, the newest intact checkpoint, instead of step_0000006: "
                       "2 steps to train again")
    (tmp_path / "step_0000004" / MANIFEST_FILE).unlink()  # an older run's checkpoint: loads with a warning
    said.clear()
    assert choose_resume_checkpoint(tmp_path, "step_0000006", "size", "trainer_state.json", said.append).name == "step_0000004"
    assert said[1].startswith("warning: ") and "no manifest.json" in said[1]
    (tmp_path / "step_0000004" / "trainer_state.json").unlink()
    (tmp_path / "step_0000002" / "trainer_state.json").write_text("{}")  # size changed
    with pytest.raises(CheckpointDamagedError, match="no intact checkpoint in"):
        choose_resume_checkpoint(tmp_path, "step_0000006", "size", "trainer_state.json", said.append)


# disk space --------------------------------------------------------------------------------------------------


def test_enospc_during_a_save_is_one_line_and_removes_the_partial_folder(tmp_path):
    from megatron_sft.train.save_guard import NoSpaceError, check_free_space, guarded_write

    tmp = tmp_path / ".step_0000004.tmp"
    tmp.mkdir()

    def write() -> None:
        (tmp / "part").write_bytes(b"x" * 100)
        raise RuntimeError("writer failed") from OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NoSpaceError) as raised:
        guarded_write(write, tmp, tmp_path, needed=3 << 30)
    assert "\n" not in str(raised.value) and str(raised.value).startswith(f"no space left on {tmp_path} (needs about 3.0 GiB, ")
    assert not tmp.exists()
    tmp.mkdir()
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through unchanged
        guarded_write(lambda: (_ for _ in ()).throw(ValueError("unrelated")), tmp, tmp_path, needed=None)
    with pytest.raises(NoSpaceError, match="needs about"):
        check_free_space(tmp_path, 1 << 60)
    check_free_space(tmp_path, None)


def test_stale_temporaries_are_removed_at_start_up(tmp_path):
    from megatron_sft.train.save_guard import remove_stale_temporaries

    (tmp_path / ".step_0000004.tmp" / "model").mkdir(parents=True)
    (tmp_path / ".latest.tmp").write_text("x")
    (tmp_path / ".step_0000002.old").mkdir()  # a replaced checkpoint whose replacement never landed
    (tmp_path / "step_0000001").mkdir()
    assert sorted(remove_stale_temporaries(tmp_path)) == [".latest.tmp", ".step_0000004.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001", "step_0000002"]


# data readers and the dropped-row limit ----------------------------------------------------------------------


def test_readers_turn_decoding_errors_into_data_errors_naming_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "1", "response": "2"}\n\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{bad}:3: not valid UTF-8; byte 0xff at column 13"):
        list(read_rows(bad))
    rows = list(read_rows(bad, bad_lines="yield"))
    assert [r.number for r in rows] == [1, 3] and rows[1].error.startswith("not valid UTF-8") and rows[0].error is None
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match="empty.jsonl: the file holds no rows"):
        list(read_rows(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file"):
        list(read_rows(tmp_path / "bad.parquet"))


def test_undecodable_lines_are_skipped_and_counted_with_on_bad_row_skip(tmp_path):
    from transformers import AutoTokenizer

    from megatron_sft.config import DataConfig
    from megatron_sft.data.formatting import Formatter, tokenize_rows
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    save_tiny_hf_model(tmp_path / "hf", layers=1)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a ?", "response": "b"}\n{"prompt": "\xff"}\n{"prompt": oops}\n')
    formatter = Formatter(tokenizer, DataConfig(max_length=64))
    examples, report = tokenize_rows(read_rows(bad, bad_lines="yield"), formatter, on_bad_row="skip")
    assert len(examples) == 1 and report.rows == 3
    assert report.skipped == Counter({"not valid UTF-8": 1, "not valid JSON": 1})
    with pytest.raises(DataError, match=rf"{bad}:2: not valid UTF-8.*data.on_bad_row=skip"):
        tokenize_rows(read_rows(bad, bad_lines="yield"), formatter, on_bad_row="error")


def test_dropped_fraction_limit():
    from megatron_sft.data.drop_limit import check_dropped_fraction
    from megatron_sft.data.formatting import TokenizeReport

    report = TokenizeReport(rows=100, kept=95, skipped=Counter({"longer than data.max_length=32": 4, "not valid UTF-8": 1}))
    check_dropped_fraction(report, 0.05, "data.train")  # exactly at the limit: allowed
    report.skipped["not valid UTF-8"] += 1
    with pytest.raises(DataError, match=r"data.train: 6 of 100 rows \(6.0%\) dropped or skipped: 4 longer than "
                                        r"data.max_length=32, 2 not valid UTF-8, more than data.max_dropped_fraction=0.05"):
        check_dropped_fraction(report, 0.05, "data.train")


# config and layout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number"),
    ("optim.betas=[0.9, 1.0]", "optim.betas must both be in [0, 1)"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("data.max_dropped_fraction=1.5", "data.max_dropped_fraction must be <= 1"),
    ("optim.clip_grad=-1", "optim.clip_grad must be >= 0"),
])
def test_numeric_keys_must_be_finite_and_in_range(tmp_path, override, message):
    from megatron_sft.config import ConfigError, load_config

    base = [f"output_dir={tmp_path}", "model.checkpoint=x", "data.train=y.jsonl"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, base + [override])


def test_layout_is_checked_against_the_model(tmp_path):
    from megatron_sft.model.args import ModelArgs
    from megatron_sft.config import ConfigError, load_config
    from megatron_sft.train.preflight import check_layout

    args = ModelArgs(architecture="Qwen2ForCausalLM", vocab_size=100, hidden_size=64, ffn_hidden_size=128, num_layers=6,
                     num_attention_heads=4, num_query_groups=1, kv_channels=16, max_position_embeddings=64,
                     norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True, rope_theta=1e4, padded_vocab_size=128)
    base = [f"output_dir={tmp_path}", "model.checkpoint=ckpt", "data.train=y.jsonl"]
    with pytest.raises(ConfigError, match="parallel.tensor=2 does not divide the 1 KV heads of the model in ckpt"):
        check_layout(args, load_config(None, base + ["parallel.tensor=2"]), 2)
    with pytest.raises(ConfigError, match="parallel.pipeline=4 does not divide the 6 layers"):
        check_layout(args, load_config(None, base + ["parallel.pipeline=4"]), 4)
    with pytest.raises(ConfigError, match="--nproc 3 is not a multiple of parallel.tensor x parallel.pipeline = 2"):
        check_layout(args, load_config(None, base + ["parallel.pipeline=2"]), 3)
    check_layout(args, load_config(None, base + ["parallel.pipeline=2"]), 4)


# logs --------------------------------------------------------------------------------------------------------


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    from megatron_sft.train.metrics_resume import cut_metrics_back

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert cut_metrics_back(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert cut_metrics_back(path, 3) == 0
