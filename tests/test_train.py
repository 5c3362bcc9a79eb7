"""The trainer on real gloo process groups: parallel layouts agree, packing is exact, resume is bit-exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sft.launch import run_local_workers
from megatron_sft.testing.train_check import (
    checkpoint_tensors, eval_metrics, logged, make_tiny_run_inputs, per_token_loss_worker, tiny_config, train_worker,
)

LAYOUTS = {
    # name: (processes, overrides)
    "tp2": (2, ["parallel.tensor=2", "parallel.sequence_parallel=false"]),  # SP is on by default with TP
    "tp2_sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "pp2_interleaved": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "dp2": (2, []),
    "dp2_no_distributed_optimizer": (2, ["parallel.distributed_optimizer=false"]),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ckpt, data = make_tiny_run_inputs(root)
    return root, ckpt, data


def _run(tiny, name: str, nproc: int, *overrides: str, resume: bool = False) -> tuple[dict, Path]:
    root, ckpt, data = tiny
    out = root / name
    config = tiny_config(ckpt, data, out, *overrides)
    summary = run_local_workers(train_worker, nproc, config.to_dict(), resume, timeout_s=600)[0]
    return summary, out


@pytest.fixture(scope="module")
def reference(tiny):
    """TP=1, PP=1, DP=1: the single-process run every layout must reproduce."""
    summary, out = _run(tiny, "reference", 1)
    return summary, out, checkpoint_tensors(summary["checkpoint"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(tiny, reference, layout):
    ref_summary, ref_out, ref_weights = reference
    nproc, overrides = LAYOUTS[layout]
    summary, out = _run(tiny, layout, nproc, *overrides)
    assert len(summary["losses"]) == 2
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(ref_summary["losses"]), rtol=1e-5, atol=1e-6)
    # the global grad norm (what clipping uses) counts every shard once
    torch.testing.assert_close(torch.tensor(logged(out, "grad_norm")), torch.tensor(logged(ref_out, "grad_norm")), rtol=1e-5, atol=0)
    # held-out evaluation after step 2: every eval row exactly once, whatever the layout
    (evaluation,), (ref_evaluation,) = eval_metrics(out), eval_metrics(ref_out)
    for key in ("eval/loss", "eval/mean_p"):
        assert abs(evaluation[key] - ref_evaluation[key]) <= 1e-5 * abs(ref_evaluation[key]), (key, evaluation, ref_evaluation)
    weights = checkpoint_tensors(summary["checkpoint"])
    initial = checkpoint_tensors(tiny[1])
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        moved = (ref_weights[key] - initial[key]).abs().max()
        assert moved > 0, f"{key} was not updated by the reference run"
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=0, atol=2e-6, msg=lambda m, k=key: f"{layout} {k}: {m}")


def test_deferred_weight_gather_completes_before_every_checkpoint(tiny, reference):
    """parallel.overlap_param_gather defers the distributed optimizer's weight all-gather to the next forward;
    with no evaluation forward between the last step and the save, the checkpoint must still hold every
    rank's updated weights (equal to the single-process run's), and turning both overlaps off changes nothing."""
    _, _, ref_weights = reference
    for name, overrides in {"dp2_overlap_no_eval": [],
                            "dp2_no_overlap_no_eval": ["parallel.overlap_grad_reduce=false",
                                                       "parallel.overlap_param_gather=false"]}.items():
        summary, _ = _run(tiny, name, 2, "train.eval_every_steps=0", *overrides)
        weights = checkpoint_tensors(summary["checkpoint"])
        for key in ref_weights:
            torch.testing.assert_close(weights[key], ref_weights[key], rtol=0, atol=2e-6, msg=lambda m, k=key: f"{name} {k}: {m}")


def test_percentile_objective_is_over_the_global_batch(tiny):
    """Top-50% by p over the global batch: 4 micro-batches on one rank == 2 micro-batches on each of 2 DP ranks
    (the cutoff comes from a forward pass over the whole step, not per micro-batch)."""
    one, _ = _run(tiny, "pct_dp1", 1, "objective.name=neg_p_top:50")
    two, _ = _run(tiny, "pct_dp2", 2, "objective.name=neg_p_top:50")
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    w1, w2 = checkpoint_tensors(one["checkpoint"]), checkpoint_tensors(two["checkpoint"])
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=2e-6)


RESUME_RUN = ["train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=2", "optim.lr=3e-3",
              "optim.schedule=cosine", "optim.warmup_steps=1", "train.epochs=3", "objective.name=nll"]


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    """6 steps at DP=2 with checkpoints every 2 (grad norms > 1: clipping is active)."""
    return _run(tiny, "uninterrupted", 2, *RESUME_RUN)


def test_resume_is_bit_exact_and_training_reduces_loss(tiny, uninterrupted):
    full, full_out = uninterrupted
    assert full["last_loss"] < 0.9 * full["first_loss"], full["losses"]
    kept = sorted(p.name for p in (full_out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_0000004", "step_0000006"]
    assert (full_out / "checkpoints" / "latest").read_text().strip() == "step_0000006"

    first, _ = _run(tiny, "interrupted", 2, *RESUME_RUN[1:], "train.max_steps=3")
    second, out = _run(tiny, "interrupted", 2, *RESUME_RUN, resume=True)
    assert first["losses"] == full["losses"][:3]
    assert second["losses"] == full["losses"][3:], "a resumed run must reproduce the uninterrupted losses exactly"
    a, b = checkpoint_tensors(full["checkpoint"]), checkpoint_tensors(second["checkpoint"])
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_at_another_layout(tiny, uninterrupted):
    """Saved at DP=2, resumed at TP=2 (model and distributed-optimizer state reshard): same run within fp32."""
    full, full_out = uninterrupted
    _run(tiny, "relayout", 2, *RESUME_RUN[1:], "train.max_steps=3")
    second, out = _run(tiny, "relayout", 2, *RESUME_RUN, "parallel.tensor=2", resume=True)
    torch.testing.assert_close(torch.tensor(second["losses"]), torch.tensor(full["losses"][3:]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(logged(out, "grad_norm")), torch.tensor(logged(full_out, "grad_norm")), rtol=1e-4, atol=0)
    a, b = checkpoint_tensors(full["checkpoint"]), checkpoint_tensors(second["checkpoint"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def _saved_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


def test_one_replica_uses_the_plain_optimizer_and_its_checkpoint_resumes_at_dp2(tiny, uninterrupted, capfd):
    """TP=2 on 2 ranks is one data-parallel replica: megatron-core's plain optimizer (nothing to shard). Its
    checkpoint's optimizer state, in the plain optimizer's format, resumes at DP=2, where a fresh run would use
    the distributed optimizer: the resumed run keeps the plain one and continues the DP=2 run within fp32."""
    full, full_out = uninterrupted
    assert _saved_state(full["checkpoint"])["distributed_optimizer"] is True  # DP=2 from the start
    capfd.readouterr()
    first, _ = _run(tiny, "one_replica", 2, *RESUME_RUN[1:], "train.max_steps=3", "parallel.tensor=2")
    assert "optimizer not sharded (one data-parallel replica: nothing to shard)" in capfd.readouterr().out
    assert _saved_state(first["checkpoint"])["distributed_optimizer"] is False
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(full["losses"][:3]), rtol=1e-5, atol=0)
    second, out = _run(tiny, "one_replica", 2, *RESUME_RUN, resume=True)
    assert "optimizer not sharded (as in step_0000003, whose optimizer state it loads" in capfd.readouterr().out
    assert _saved_state(second["checkpoint"])["distributed_optimizer"] is False
    torch.testing.assert_close(torch.tensor(second["losses"]), torch.tensor(full["losses"][3:]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(logged(out, "grad_norm")), torch.tensor(logged(full_out, "grad_norm")), rtol=1e-4, atol=0)
    a, b = checkpoint_tensors(full["checkpoint"]), checkpoint_tensors(second["checkpoint"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def test_existing_run_needs_resume(tiny):
    root, ckpt, data = tiny
    _run(tiny, "twice", 1, "train.max_steps=1")
    with pytest.raises(RuntimeError, match="pass --resume"):
        _run(tiny, "twice", 1, "train.max_steps=1")


def test_packing_gives_the_same_per_token_loss_as_unpacked_rows_and_hf(tiny):
    """Block-diagonal attention: a packed example sees only itself. Per-token NLL at TP=2 equals unpacked rows
    and the HF model's own cross-entropy on response tokens (prompts carry no loss)."""
    from transformers import AutoModelForCausalLM

    root, ckpt, data = tiny
    packed = run_local_workers(per_token_loss_worker, 2, str(ckpt), str(data), True, 2)[0]
    unpacked = run_local_workers(per_token_loss_worker, 2, str(ckpt), str(data), False, 2)[0]
    assert packed.keys() == unpacked.keys() and len(packed) == 48
    # negative control: attention across the packed sequences (a packing bug) moves losses far beyond the
    # tolerance below, so the comparison can see one
    leaky = run_local_workers(per_token_loss_worker, 2, str(ckpt), str(data), True, 2, 48, False, True)[0]
    leak = max(float((leaky[w]["loss"] - unpacked[w]["loss"]).abs().max()) for w in unpacked)
    assert leak > 1e-2, leak
    hf = AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    from megatron_sft.config import DataConfig
    from megatron_sft.data.formatting import Formatter
    from megatron_sft.data.sources import read_rows

    formatter = Formatter(AutoTokenizer.from_pretrained(str(root / "hf")), DataConfig(max_length=48))
    for row in read_rows(data):
        example = formatter(row)
        p, u = packed[row.where], unpacked[row.where]
        torch.testing.assert_close(p["loss"], u["loss"], rtol=1e-5, atol=1e-6)
        assert torch.equal(p["trained"], u["trained"])
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logp = hf(ids).logits.log_softmax(-1)[0, :-1]
        target = ids[0, 1:]
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        response = torch.tensor(example.target_mask[1:], dtype=torch.bool)
        assert torch.equal(u["trained"][:-1], response), "loss must be on response tokens only"
        assert not bool(u["trained"][-1])
        torch.testing.assert_close(u["loss"][:-1][response], nll[response], rtol=1e-4, atol=1e-5)
        assert bool((u["loss"][:-1][~response] == 0).all())


def _train_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_sft", "train", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_bad_row_names_file_and_row(tiny, tmp_path):
    root, ckpt, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a ?", "response": "b"}) + "\n" + json.dumps({"prompt": "a ?"}) + "\n")
    args = [f"output_dir={tmp_path / 'out'}", f"model.checkpoint={ckpt}", f"data.train={bad}", "log.progress_bar=false"]
    completed = _train_cli(args)
    assert completed.returncode == 2
    assert f"{bad}:2" in completed.stdout and "data.on_bad_row=skip" in completed.stdout


def test_config_errors_name_the_key(tmp_path):
    from megatron_sft.config import ConfigError, load_config

    base = [f"output_dir={tmp_path}", "model.checkpoint=x", "data.train=y.jsonl"]
    with pytest.raises(ConfigError, match="unknown key optim.learning_rate"):
        load_config(None, base + ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="train.micro_batch_size: expected an integer"):
        load_config(None, base + ["train.micro_batch_size=1.5"])
    with pytest.raises(ConfigError, match="objective.reduction"):
        load_config(None, base + ["objective.reduction=sum"])
    with pytest.raises(ValueError, match="Valid objective specs"):
        load_config(None, base + ["objective.name=bogus"])
    config_file = tmp_path / "c.yaml"
    config_file.write_text("optim:\n  lr: 2.0e-5\n  betas: [0.9, 0.99]\ndata:\n  train: [a.jsonl, b.jsonl]\n")
    config = load_config(config_file, base[:2] + ["optim.lr=3e-5"])
    assert config.optim.lr == 3e-5 and config.optim.betas == (0.9, 0.99) and config.data.train == ["a.jsonl", "b.jsonl"]
    # recipe defaults
    d = load_config(None, base)
    assert (d.optim.lr, d.optim.betas, d.optim.weight_decay, d.optim.warmup_ratio, d.optim.schedule, d.optim.clip_grad,
            d.train.global_batch_size, d.train.epochs) == (5e-5, (0.9, 0.95), 0.01, 0.1, "cosine", 1.0, 256, None)
    from megatron_sft.train.trainer import schedule_length

    assert schedule_length(d.train, 10) == (30, 30)  # epochs unset, no max_steps: 3 epochs


def _signal_after_step_2(tiny, out: Path, sig: int) -> tuple[list[str], subprocess.Popen, str]:
    """`megatron-sft train --nproc 2` at TP=2 for up to 300 steps, sent ``sig`` once step 2 is logged; returns
    its arguments, the finished process and its whole output."""
    _, ckpt, data = tiny
    args = [f"output_dir={out}", f"model.checkpoint={ckpt}", f"data.train={data}", "data.max_length=32",
            "train.global_batch_size=8", "train.micro_batch_size=2", "train.epochs=50", "train.max_steps=300",
            "log.progress_bar=false", "log.tensorboard=false", "checkpoint.export_hf=false", "parallel.tensor=2"]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sft", "train", *args, "--nproc", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return args, proc, "".join(lines) + rest


def test_sigusr1_saves_and_exits_then_resumes(tiny, tmp_path):
    """Slurm preemption: the signal (forwarded by --nproc to both TP ranks) is honoured at the end of the
    current step on every rank, with a checkpoint, and the run resumes from it."""
    root, ckpt, data = tiny
    out = tmp_path / "preempted"
    args, proc, output = _signal_after_step_2(tiny, out, signal.SIGUSR1)
    assert proc.returncode == 0, output
    assert "received signal" in output
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert 2 <= step < 300
    resumed = _train_cli(args + ["train.max_steps=" + str(step + 1), "--resume", "--nproc", "2"],
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {latest}" in resumed.stdout
    assert f"step {step + 1}/{step + 1}" in resumed.stdout


def test_non_finite_steps_halt_or_are_skipped(tiny, tmp_path):
    """lr 1e30 without clipping breaks the weights at step 1; step 2's loss is NaN."""
    _, ckpt, data = tiny
    args = [f"model.checkpoint={ckpt}", f"data.train={data}", "data.max_length=32", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.max_steps=3", "optim.lr=1e30", "optim.clip_grad=0",
            "optim.warmup_steps=0", "log.progress_bar=false", "log.tensorboard=false", "checkpoint.export_hf=false"]
    halted = _train_cli(args + [f"output_dir={tmp_path / 'halt'}"])
    assert halted.returncode == 1, halted.stdout + halted.stderr
    assert "halted: non-finite loss" in halted.stdout and "train.on_nonfinite=skip" in halted.stdout
    skipped = _train_cli(args + [f"output_dir={tmp_path / 'skip'}", "train.on_nonfinite=skip"])
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert skipped.stdout.count("SKIPPED (non-finite)") == 2


ADAPTIVE_RUN = ["objective.name=adaptive_mix:0:0.5", "train.max_steps=4", "train.epochs=3", "optim.lr=3e-3",
                "optim.schedule=constant", "checkpoint.every_steps=2"]


def test_adaptive_objective_follows_the_running_mean_p_at_any_layout_and_resumes(tiny):
    """adaptive_mix: the weight of -p follows the moving average of the logged mean p (the first step's
    batch measured before it trains); TP=2 gives the same run, and a resumed run continues it exactly."""
    from megatron_sft.objectives import parse_objective

    one, out = _run(tiny, "adaptive_tp1", 1, *ADAPTIVE_RUN)
    schedule = parse_objective("adaptive_mix:0:0.5").adaptive
    mean_p, params = logged(out, "mean_p"), logged(out, "adaptive_parameter")
    running = mean_p[0]
    for step, param in enumerate(params):
        assert param == pytest.approx(schedule.parameter(running), rel=1e-6), (step, params, mean_p)
        running = 0.9 * running + 0.1 * mean_p[step]
    assert params[-1] > params[0] > 0  # training raised p, so the objective moved towards -p
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["objective"] for r in records] == [f"mix:{p:g}" for p in params]

    two, out2 = _run(tiny, "adaptive_tp2", 2, *ADAPTIVE_RUN, "parallel.tensor=2")
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(logged(out2, "adaptive_parameter")), torch.tensor(params), rtol=1e-5, atol=0)

    _run(tiny, "adaptive_resumed", 1, *ADAPTIVE_RUN, "train.max_steps=2")
    resumed, out3 = _run(tiny, "adaptive_resumed", 1, *ADAPTIVE_RUN, resume=True)
    assert resumed["losses"] == one["losses"][2:]
    assert logged(out3, "adaptive_parameter") == params


def test_model_only_checkpoint_and_hf_export_hold_the_trained_weights(tiny):
    """checkpoint.save_optimizer=false writes the model without optimizer state (and --resume refuses it by
    name); checkpoint.export_hf=true writes OUTPUT/hf, whose float64 NLL on the held-out rows equals the
    trainer's own eval loss after the last step (the export holds the trained weights, not the initial ones)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sft.data.formatting import Formatter
    from megatron_sft.data.sources import read_rows

    from megatron_sft.config import load_config

    root, _, data = tiny
    run = ["objective.name=nll", "checkpoint.save_optimizer=false", "checkpoint.export_hf=true"]
    summary, out = _run(tiny, "model_only", 1, *run)
    step_dir = Path(summary["checkpoint"])
    assert any((step_dir / "model").iterdir()) and not list(step_dir.glob("optimizer/*"))
    assert json.loads((step_dir / "trainer_state.json").read_text())["has_optimizer"] is False
    assert summary["export"] == str(out / "hf")
    formatter = Formatter(AutoTokenizer.from_pretrained(str(out / "hf")), load_config(out / "config.yaml").data)

    def held_out_nll(model_dir: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
        total, count = 0.0, 0
        for row in read_rows(data):
            example = formatter(row)
            ids = torch.tensor([example.input_ids])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
            trained = torch.tensor(example.target_mask[1:], dtype=torch.bool)
            total, count = total - float(logp[trained].sum()), count + int(trained.sum())
        return total / count

    (evaluation,) = eval_metrics(out)
    exported = held_out_nll(out / "hf")
    assert abs(exported - evaluation["eval/loss"]) <= 1e-5 * exported, (exported, evaluation)
    assert abs(held_out_nll(root / "hf") - exported) > 1e-3, "the export must differ from the initial model"
    with pytest.raises(RuntimeError, match="saved without optimizer state"):
        _run(tiny, "model_only", 1, *run, "train.max_steps=3", resume=True)


def test_sigterm_saves_and_exits(tiny, tmp_path):
    """SIGTERM (preemption, scancel) to a running `--nproc 2` job: every rank finishes the step, one checkpoint
    is saved, exit 0, and no COMPLETED marker (so a job chain requeues it)."""
    root, ckpt, data = tiny
    out = tmp_path / "terminated"
    args, proc, output = _signal_after_step_2(tiny, out, signal.SIGTERM)
    assert proc.returncode == 0, output
    assert "received signal" in output, output
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert 2 <= step < 300 and f"checkpoint saved at step {step}" in output, output
    assert len(json.loads("[" + ",".join((out / "metrics.jsonl").read_text().splitlines()) + "]")) == step
    assert not (out / "COMPLETED").exists()
