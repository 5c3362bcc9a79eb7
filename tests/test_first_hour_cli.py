"""Issue 23, items 2, 3 and 6: overrides after flags, progress during long phases and a continuum table that
survives an interruption, and ``train.max_steps`` as the schedule's length (as HF Trainer's max_steps)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_sft.config import DEFAULT_EPOCHS, TrainConfig, load_config
from megatron_sft.train.trainer import schedule_length


def _print(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_sft", "train", *args], capture_output=True, text=True,
                          timeout=120)


def test_overrides_are_accepted_after_flags(tmp_path):
    """Item 2: `train CFG --nproc 2 objective.name=nll` used to fail with "unrecognized arguments"."""
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nmodel:\n  checkpoint: ckpt\ndata:\n  train: [t.jsonl]\n")
    for argv in ([str(config), "--nproc", "2", "objective.name=neg_p", "--print", "objective.name"],
                 [str(config), "--print", "objective.name", "--nproc", "2", "objective.name=neg_p"],
                 ["--nproc", "2", str(config), "objective.name=neg_p", "--print", "objective.name"]):
        done = _print(*argv)
        assert (done.returncode, done.stdout.strip()) == (0, "neg_p"), (argv, done.stderr)
    done = _print(str(config), "--nproc", "2", "--no-such-flag", "--print", "objective.name")
    assert done.returncode == 2 and "unrecognized arguments: --no-such-flag" in done.stderr


@pytest.mark.parametrize("epochs, max_steps, per_epoch, expected", [
    (None, None, 10, (10 * DEFAULT_EPOCHS, 10 * DEFAULT_EPOCHS)),
    (None, 7, 10, (7, 7)),  # max_steps alone: the schedule fits inside it
    (None, 25, 10, (25, 25)),  # ... even past one epoch (the data repeats)
    (2, 7, 10, (20, 7)),  # with epochs: the schedule spans the epochs, max_steps stops early
    (2, None, 10, (20, 20)),
    (1, 50, 10, (10, 10)),
])
def test_schedule_length(epochs, max_steps, per_epoch, expected):
    assert schedule_length(TrainConfig(epochs=epochs, max_steps=max_steps), per_epoch) == expected


def test_max_steps_alone_ends_the_schedule_at_min_lr(tmp_path):
    """Item 6, end to end: a 4-step run with max_steps alone warms up and decays inside its 4 steps."""
    from megatron_sft.launch import run_local_workers
    from megatron_sft.testing.train_check import logged, make_tiny_run_inputs, train_worker

    ckpt, data = make_tiny_run_inputs(tmp_path, rows=16, layers=1)
    config = load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"model.checkpoint={ckpt}", f"data.train={data}", "data.max_length=32",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.max_steps=4", "optim.lr=1e-3",
        "optim.min_lr=1e-5", "optim.warmup_steps=1", "optim.schedule=linear", "checkpoint.export_hf=false",
        "log.progress_bar=false", "log.tensorboard=false"])
    assert config.train.epochs is None
    summary = run_local_workers(train_worker, 1, config.to_dict(), False, timeout_s=300)[0]
    lrs = logged(tmp_path / "run", "lr")
    assert summary["steps"] == 4 and len(lrs) == 4
    # the lr each step applied, megatron-core's schedule over 4 steps: warmup from 0, then linear decay that
    # reaches min_lr at step 4 (the 3 epochs of the old default would still be at 0.6e-3 here)
    expected = [0.0, 1e-3] + [1e-3 - (1e-3 - 1e-5) * k / 3 for k in (1, 2)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12), lrs


def test_pretraining_shows_progress(tmp_path, capfd):
    """Item 3: the demo's base-model pre-training reports progress instead of minutes of silence."""
    from megatron_sft.toy.hf_loop import pretrain_base_model
    from megatron_sft.toy.letter_task import shift_task_rows
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    save_tiny_hf_model(tmp_path / "hf", "qwen2-tied-gqa", layers=1, hidden=32, seed=0)
    pretrain_base_model(tmp_path / "hf", shift_task_rows(8, seed=0), steps=3)
    err = capfd.readouterr().err
    assert "pre-training the base model" in err and "3/3" in err


# the continuum's table rewritten after every run (an interrupted run keeps it): tests/test_continuum_stats.py
