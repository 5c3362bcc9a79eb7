"""The SFT training loop: data, model, steps, logging, checkpoints, preemption, export.

Run on every rank of a torchrun / Slurm job (or on local processes via ``megatron-sft train --nproc N``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sft import stop_signal
from megatron_sft.data.drop_limit import check_dropped_fraction, dropped_summary
from megatron_sft.library_warnings import quiet_library_warnings
from megatron_sft.model.checkpoint import TOKENIZER_DIR
from megatron_sft.objectives import parse_objective
from megatron_sft.parallel import current_device
from megatron_sft.train.batches import BatchShape, TrainingRows, load_rows, round_up
from megatron_sft.train.checkpoint_integrity import choose_resume_checkpoint
from megatron_sft.train.checkpointing import LATEST, STATE_FILE, load_training_checkpoint, save_training_checkpoint
from megatron_sft.train.config import Config, ConfigError, check_checkpoint_exists
from megatron_sft.train.logger import RunLogger, flops_per_token, peak_flops
from megatron_sft.train.model_setup import build_training_model
from megatron_sft.train.run_lock import RunLockedError, lock_for_training
from megatron_sft.train.save_guard import remove_stale_temporaries
from megatron_sft.train.step import StepRunner


@dataclass
class TrainSummary:
    steps: int  # optimizer steps taken in total (including before a resume)
    first_loss: Optional[float]
    last_loss: Optional[float]
    first_mean_p: Optional[float]
    last_mean_p: Optional[float]
    checkpoint: Optional[str]
    export: Optional[str]
    stopped_by_signal: bool
    losses: list[float]


class _StopSignal:
    """SIGTERM / SIGUSR1 (Slurm preemption or time limit) ask for a checkpoint and a clean exit."""

    def __init__(self) -> None:
        stop_signal.install()  # usually installed already at process start (a stop during start-up counts too)

    @property
    def received(self) -> Optional[int]:
        return stop_signal.received()

    def agreed(self) -> bool:
        """True on every rank when any rank got a signal (ranks must stop at the same step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=current_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _data_report(name: str, data: TrainingRows, packing: bool) -> str:
    r = data.report
    lines = [f"{name}: {r.rows} rows read, {r.kept} used, {r.truncated} truncated, "
             f"{sum(r.skipped.values())} skipped; {data.sequences} sequences -> {len(data.rows)} "
             f"{'packed rows' if packing else 'rows'}; {data.tokens} tokens, {data.target_tokens} trained on; "
             f"{dropped_summary(r)}"]
    for reason, count in r.skipped.items():
        lines.append(f"  skipped {count}: {reason}")
    for message in r.first_skipped:
        lines.append(f"  e.g. {message}")
    return "\n".join(lines)


def train(cfg: Config, resume: bool = False) -> TrainSummary:
    """The whole run, holding the output directory's run lock (run_lock.py) from before anything is written."""
    from megatron_sft.parallel import init_distributed

    stop_signal.install()
    quiet_library_warnings()
    rank, _ = init_distributed()
    lock, refusal = None, [None]
    try:
        lock = lock_for_training(cfg.output_dir, rank)
    except RunLockedError as err:
        refusal = [str(err)]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)  # every rank stops when rank 0 is refused
    if refusal[0] is not None:
        raise RunLockedError(refusal[0])
    try:
        if _StopSignal().agreed():  # stopped while starting: leave before reading data or building the model
            return _stopped_at_start_up(rank == 0)
        return _train(cfg, resume)
    finally:
        if lock is not None:
            lock.release()


def _stopped_at_start_up(main: bool) -> TrainSummary:
    if main:
        print(f"received signal {stop_signal.received() or 'on another rank'} during start-up: exiting before "
              "training with nothing new to save. Continue with --resume.", flush=True)
    return TrainSummary(steps=0, first_loss=None, last_loss=None, first_mean_p=None, last_mean_p=None, checkpoint=None,
                        export=None, stopped_by_signal=True, losses=[])


def _resume_checkpoint(checkpoints: Path, resume: bool, verify: str, main: bool) -> Optional[Path]:
    """Collective. None for a fresh run; else the newest intact checkpoint (damaged ones reported, skipped)."""
    if main:
        removed = remove_stale_temporaries(checkpoints)
        if removed:
            print(f"removed {len(removed)} unfinished save(s) of an earlier run: {', '.join(removed)}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    latest = pointer.read_text().strip()
    if not resume:
        raise ConfigError(f"{checkpoints.parent} already has checkpoints (latest: {latest}); pass --resume to continue "
                          "that run, or choose another output_dir")
    say = (lambda message: print(message, flush=True)) if main else (lambda message: None)
    return choose_resume_checkpoint(checkpoints, latest, verify, STATE_FILE, say)


def _train(cfg: Config, resume: bool) -> TrainSummary:
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from megatron_sft.data.sampler import ShardedSampler
    from megatron_sft.parallel import init_distributed, init_model_parallel

    quiet_library_warnings()
    rank, world = init_distributed()
    par = cfg.parallel
    init_model_parallel(par.tensor, par.pipeline, par.virtual_pipeline, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    main = rank == 0
    out = Path(cfg.output_dir)
    checkpoints = out / "checkpoints"
    existing = _resume_checkpoint(checkpoints, resume, cfg.checkpoint.verify, main)
    if main:  # a resumed run is not complete until it finishes again (job scripts requeue on its absence)
        (out / COMPLETED_MARKER).unlink(missing_ok=True)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} must be a multiple of train.micro_batch_size "
                          f"({t.micro_batch_size}) x data-parallel size ({dp} = {world} ranks / (TP {par.tensor} x PP {par.pipeline}))")
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    if par.virtual_pipeline and num_micro % par.pipeline:
        raise ConfigError(f"interleaved pipelining needs the micro-batches per rank ({num_micro}) to be a multiple of "
                          f"parallel.pipeline ({par.pipeline}); raise train.global_batch_size")

    check_checkpoint_exists(cfg)
    tokenizer_dir = Path(cfg.model.checkpoint) / TOKENIZER_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = load_rows(cfg.data.train, cfg.data, tokenizer)
    check_dropped_fraction(data.report, cfg.data.max_dropped_fraction, "data.train")
    eval_data = load_rows(cfg.data.eval, cfg.data, tokenizer) if cfg.data.eval else None
    if eval_data is not None:
        check_dropped_fraction(eval_data.report, cfg.data.max_dropped_fraction, "data.eval")
    sampler = ShardedSampler(len(data.rows), t.global_batch_size, dp_rank, dp, seed=cfg.data.seed)
    total_steps = sampler.steps_per_epoch * t.epochs
    run_steps = min(total_steps, t.max_steps) if t.max_steps else total_steps
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shape = BatchShape(t.micro_batch_size, pad_id, par.tensor,
                       round_up(cfg.data.max_length, par.tensor) if par.pipeline > 1 else None)

    model = build_training_model(cfg, total_steps)
    objective = parse_objective(cfg.objective.name)
    runner = StepRunner(model, objective, cfg.objective)
    start_step = 0
    if existing is not None:
        state = load_training_checkpoint(model, existing)
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        runner.running_mean_p = state.get("running_mean_p")

    log = RunLogger(out, cfg.log, run_steps, start_step, enabled=main, run_config=cfg.to_dict())
    if main:
        cfg.save(out / "config.yaml")
        log.print(_data_report("train data", data, cfg.data.packing))
        if eval_data is not None:
            log.print(_data_report("eval data", eval_data, cfg.data.packing))
        if sampler.repeated_per_epoch:
            log.print(f"  {len(data.rows)} rows do not fill whole global batches of {t.global_batch_size}: the last step of "
                      f"each epoch repeats {sampler.repeated_per_epoch} rows of that epoch (none is dropped)")
        log.print(f"layout: {world} ranks = TP {par.tensor} x PP {par.pipeline}"
                  f"{f' (x{par.virtual_pipeline} virtual)' if par.virtual_pipeline else ''} x DP {dp}"
                  f"{', SP' if par.sequence_parallel and par.tensor > 1 else ''}; {num_micro} micro-batches of "
                  f"{t.micro_batch_size} per rank per step; output loss "
                  f"{f'fused (chunks of {model.loss_chunk_tokens} tokens)' if model.loss_chunk_tokens else 'unfused'}; "
                  f"objective {objective.spec} ({objective.formula}); "
                  f"{total_steps} steps over {t.epochs} epochs"
                  f"{f', running {run_steps}' if run_steps < total_steps else ''}"
                  f"{f'; resumed from {existing.name}' if existing is not None else ''}")

    peak = peak_flops()
    mean_len = data.tokens / max(data.sequences, 1)
    flops_token = flops_per_token(model.args, mean_len)
    stop = _StopSignal()
    losses: list[float] = []
    first_p = last_p = None
    saved: Optional[Path] = existing
    step = start_step
    trainer_state = lambda: {"sampler": sampler.state_dict(), "data_rows": len(data.rows),  # noqa: E731
                             "running_mean_p": runner.running_mean_p}
    stopped = stop.agreed()  # a stop during start-up: exit before the first step, nothing new to save
    if stopped:
        log.print(f"received signal {stop.received or 'on another rank'} during start-up: exiting before step "
                  f"{step + 1} with nothing new to save. Continue with --resume.")
    while not stopped and step < run_steps:
        epoch, epoch_step, rows = sampler.next_step()
        micro_batches = shape.micro_batches([data.rows[i] for i in rows])
        result = runner.train_step(micro_batches, t.on_nonfinite)
        step += 1
        losses.append(result.loss)
        first_p = result.mean_p if first_p is None else first_p
        last_p = result.mean_p
        tokens_per_s = result.tokens / max(result.seconds, 1e-9)
        metrics = {
            "loss": result.loss, "mean_p": result.mean_p, "selected_fraction": result.selected_fraction,
            "lr": result.lr, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
            "step_seconds": result.seconds, "mfu": tokens_per_s * flops_token / (peak * world) if peak else None,
            "skipped": result.skipped,
        }
        if result.adaptive_parameter is not None:
            metrics.update(objective=result.objective, adaptive_parameter=result.adaptive_parameter)
        if eval_data is not None and t.eval_every_steps and (step % t.eval_every_steps == 0 or step == run_steps):
            evaluation = evaluate_rows(runner, shape, eval_data, dp, dp_rank, par.pipeline if par.virtual_pipeline else 1)
            metrics.update({f"eval/{k}": v for k, v in evaluation.items()})
        log.log_step(step, run_steps, epoch + (epoch_step + 1) / sampler.steps_per_epoch, metrics)
        stopped = stop.agreed()
        every = cfg.checkpoint.every_steps
        if stopped or (every and step % every == 0) or step == run_steps:
            saved = save_training_checkpoint(model, checkpoints, step, trainer_state(), tokenizer_dir,
                                             cfg.checkpoint.save_optimizer, cfg.checkpoint.keep_last)
            log.print(f"saved checkpoint {saved}")
        if stopped:
            log.print(f"received signal {stop.received or 'on another rank'}: checkpoint saved at step {step}; "
                      f"exiting. Continue with --resume.")
            break

    exported = None
    if not stopped and cfg.checkpoint.export_hf and saved is not None:
        exported = export_hf(saved, out / "hf", main)
        log.print(f"exported HF model to {exported}")
    log.close()
    summary = TrainSummary(
        steps=step, first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
        first_mean_p=first_p, last_mean_p=last_p, checkpoint=str(saved) if saved else None,
        export=str(exported) if exported else None, stopped_by_signal=stopped, losses=losses,
    )
    if main and not stopped:
        _write_completed_marker(out, summary)
    return summary


COMPLETED_MARKER = "COMPLETED"


def _write_completed_marker(out: Path, summary: TrainSummary) -> None:
    """OUTPUT/COMPLETED tells a job script that the run finished (absent: stopped by a signal, requeue it)."""
    content = {k: v for k, v in asdict(summary).items() if k != "losses"}
    tmp = out / f".{COMPLETED_MARKER}.tmp"
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, out / COMPLETED_MARKER)


def evaluate_rows(runner: StepRunner, shape: BatchShape, data: TrainingRows, dp: int, dp_rank: int, multiple: int) -> dict:
    """Held-out loss and mean p over every eval row exactly once: each DP rank takes a contiguous share,
    filled up to whole micro-batches (``multiple`` of them, for interleaved PP) with loss-free copies."""
    import dataclasses

    n = len(data.rows)
    per_rank = round_up(-(-n // dp), shape.micro_batch_size * multiple)
    rows = []
    for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank):
        row = data.rows[i % n]
        rows.append(row if i < n else dataclasses.replace(row, target_mask=[0] * len(row)))
    return runner.evaluate(shape.micro_batches(rows))


_RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "ROLE_RANK", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE")


def export_hf(checkpoint: Path, out_dir: Path, main: bool) -> Path:
    """Rank 0 converts the final checkpoint in a child process (its own single-rank megatron state)."""
    if main:
        command = [sys.executable, "-m", "megatron_sft", "convert", "mcore-to-hf", "--checkpoint", str(checkpoint),
                   "--out", str(out_dir), "--overwrite", "--no-progress"]
        # the child is a fresh single-process job: hide this job's rendezvous variables from it
        env = {k: v for k, v in os.environ.items()
               if k not in _RENDEZVOUS_VARS and not k.startswith(("TORCHELASTIC_", "SLURM_"))}
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        if completed.returncode != 0:
            raise RuntimeError(f"HF export failed ({' '.join(command)}):\n{completed.stdout}\n{completed.stderr}")
    if dist.is_initialized():
        dist.barrier()
    return out_dir
