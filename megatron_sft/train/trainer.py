"""The SFT training loop: data, model, steps, logging, checkpoints, preemption, export.

Run on every rank of a torchrun / Slurm job (or on local processes via ``megatron-sft train --nproc N``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sft import stop_signal
from megatron_sft.data.drop_limit import check_dropped_fraction, dropped_summary
from megatron_sft.library_warnings import quiet_library_warnings
from megatron_sft.memory.check import compare_with_measured, measured_peak_bytes, predicted_line, reset_peak
from megatron_sft.model.checkpoint import TOKENIZER_DIR, load_tokenizer, pad_token_id
from megatron_sft.objectives import parse_objective
from megatron_sft.parallel import current_device
from megatron_sft.data.batches import BatchShape, TrainingRows, batch_shape, data_parallel_share, load_rows
from megatron_sft.data.sampler import ShardedSampler
from megatron_sft.train.checkpoint_integrity import choose_resume_checkpoint
from megatron_sft.train.checkpointing import (LATEST, STATE_FILE, load_training_checkpoint, save_training_checkpoint,
                                              saved_distributed_optimizer)
from megatron_sft.config import DEFAULT_EPOCHS, Config, ConfigError, TrainConfig, check_checkpoint_exists
from megatron_sft.train.logger import RunLogger, flops_per_token, peak_flops
from megatron_sft.train.model_setup import TrainingModel, build_training_model, data_parallel_replicas, optimizer_sharding
from megatron_sft.train.preflight import check_existing_checkpoints
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


def _resume_checkpoint(cfg: Config, resume: bool, main: bool) -> Optional[Path]:
    """Collective. None for a fresh run; else the newest intact checkpoint (damaged ones reported, skipped)."""
    checkpoints, verify = Path(cfg.output_dir) / "checkpoints", cfg.checkpoint.verify
    if main:
        removed = remove_stale_temporaries(checkpoints)
        if removed:
            print(f"removed {len(removed)} unfinished save(s) of an earlier run: {', '.join(removed)}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    check_existing_checkpoints(cfg, resume)  # the launcher's preflight rule: refused without --resume
    latest = pointer.read_text().strip()
    say = (lambda message: print(message, flush=True)) if main else (lambda message: None)
    return choose_resume_checkpoint(checkpoints, latest, verify, STATE_FILE, say)


@dataclass
class _Layout:
    """Where this rank sits in the data-parallel dimension and how many micro-batches it runs per step."""
    world: int
    dp: int
    dp_rank: int
    micro_batches: int


def _data_parallel_layout(cfg: Config, world: int) -> _Layout:
    from megatron.core import parallel_state as ps

    par, t = cfg.parallel, cfg.train
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} must be a multiple of train.micro_batch_size "
                          f"({t.micro_batch_size}) x data-parallel size ({dp} = {world} ranks / (TP {par.tensor} x PP {par.pipeline}))")
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    if par.virtual_pipeline and num_micro % par.pipeline:
        raise ConfigError(f"interleaved pipelining needs the micro-batches per rank ({num_micro}) to be a multiple of "
                          f"parallel.pipeline ({par.pipeline}); raise train.global_batch_size")
    return _Layout(world, dp, dp_rank, num_micro)


def schedule_length(t: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(steps the LR schedule spans, steps this run takes). ``train.max_steps`` alone sets both, as HF
    Trainer's ``max_steps`` does (the data repeats as needed); with ``train.epochs`` also set, the schedule
    spans the epochs and max_steps only stops early."""
    if t.max_steps is not None and t.epochs is None:
        return t.max_steps, t.max_steps
    total = steps_per_epoch * (t.epochs if t.epochs is not None else DEFAULT_EPOCHS)
    return total, min(total, t.max_steps) if t.max_steps else total


@dataclass
class _RunData:
    """The run's tokenised rows, their order and the step counts that follow from them."""
    tokenizer_dir: Path
    train: TrainingRows
    eval: Optional[TrainingRows]
    sampler: ShardedSampler
    shape: BatchShape
    total_steps: int  # the LR schedule's length
    run_steps: int


def _load_run_data(cfg: Config, layout: _Layout) -> _RunData:
    check_checkpoint_exists(cfg)
    tokenizer = load_tokenizer(cfg.model.checkpoint)
    data = load_rows(cfg.data.train, cfg.data, tokenizer)
    check_dropped_fraction(data.report, cfg.data.max_dropped_fraction, "data.train")
    eval_data = load_rows(cfg.data.eval, cfg.data, tokenizer) if cfg.data.eval else None
    if eval_data is not None:
        check_dropped_fraction(eval_data.report, cfg.data.max_dropped_fraction, "data.eval")
    t = cfg.train
    sampler = ShardedSampler(len(data.rows), t.global_batch_size, layout.dp_rank, layout.dp, seed=cfg.data.seed)
    total_steps, run_steps = schedule_length(t, sampler.steps_per_epoch)
    return _RunData(Path(cfg.model.checkpoint) / TOKENIZER_DIR, data, eval_data, sampler,
                    batch_shape(cfg, t.micro_batch_size, pad_token_id(tokenizer)), total_steps, run_steps)


def _start_up_lines(cfg: Config, layout: _Layout, run: _RunData, model: TrainingModel, objective,
                    existing: Optional[Path]) -> list[str]:
    """What rank 0 prints before the first step: the data reports and the layout line."""
    par, t = cfg.parallel, cfg.train
    lines = [_data_report("train data", run.train, cfg.data.packing)]
    if run.eval is not None:
        lines.append(_data_report("eval data", run.eval, cfg.data.packing))
    if run.sampler.repeated_per_epoch:
        lines.append(f"  {len(run.train.rows)} rows do not fill whole global batches of {t.global_batch_size}: the last "
                     f"step of each epoch repeats {run.sampler.repeated_per_epoch} rows of that epoch (none is dropped)")
    epochs = run.total_steps / run.sampler.steps_per_epoch
    lines.append(f"layout: {layout.world} ranks = TP {par.tensor} x PP {par.pipeline}"
                 f"{f' (x{par.virtual_pipeline} virtual)' if par.virtual_pipeline else ''} x DP {layout.dp}"
                 f"{f' ({model.args.num_moe_experts} experts over EP {par.expert})' if model.args.is_moe else ''}"
                 f"{', SP' if par.sequence_parallel and par.tensor > 1 else ''}; attention "
                 f"{getattr(model.modules[0], 'attention_backend', cfg.model.attention_backend)}"
                 f"{' (auto)' if cfg.model.attention_backend == 'auto' else ''}; {layout.micro_batches} micro-batches of "
                 f"{t.micro_batch_size} per rank per step; optimizer "
                 f"{'distributed (ZeRO-1)' if model.distributed_optimizer else 'not sharded'}"
                 f"{_optimizer_reason(cfg, model, existing)}; output loss "
                 f"{f'fused (chunks of {model.loss_chunk_tokens} tokens)' if model.loss_chunk_tokens else 'unfused'}; "
                 f"objective {objective.spec} ({objective.formula}); "
                 f"{run.total_steps} steps over {epochs:g} epochs"
                 f"{f', running {run.run_steps}' if run.run_steps < run.total_steps else ''}"
                 f"{f'; resumed from {existing.name}' if existing is not None else ''}")
    return lines


def _optimizer_reason(cfg: Config, model: TrainingModel, existing: Optional[Path]) -> str:
    """Why the optimizer differs from ``parallel.distributed_optimizer``, if it does."""
    if model.distributed_optimizer == cfg.parallel.distributed_optimizer:
        return ""
    if model.distributed_optimizer == optimizer_sharding(cfg.parallel, data_parallel_replicas()).distributed:
        return " (one data-parallel replica: nothing to shard)"
    return (f" (as in {existing.name if existing else 'the checkpoint'}, whose optimizer state it loads: the two "
            "optimizers save it differently)")


class _Throughput:
    """tokens/s and MFU of a step (MFU from the dense model FLOPs at the data's mean sequence length)."""

    def __init__(self, model: TrainingModel, data: TrainingRows, world: int) -> None:
        self.peak = peak_flops()
        self.flops_per_token = flops_per_token(model.args, data.tokens / max(data.sequences, 1))
        self.world = world

    def metrics(self, tokens: int, seconds: float) -> dict:
        tokens_per_s = tokens / max(seconds, 1e-9)
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.world) if self.peak else None
        return {"tokens_per_s": tokens_per_s, "step_seconds": seconds, "mfu": mfu}


def _step_metrics(result, throughput: _Throughput) -> dict:
    metrics = {"loss": result.loss, "mean_p": result.mean_p, "selected_fraction": result.selected_fraction,
               "lr": result.lr, "grad_norm": result.grad_norm, **throughput.metrics(result.tokens, result.seconds),
               "skipped": result.skipped}
    if result.adaptive_parameter is not None:
        metrics.update(objective=result.objective, adaptive_parameter=result.adaptive_parameter)
    if result.moe_aux_loss is not None:  # apart from the objective's loss, which it is not part of
        metrics["moe_aux_loss"] = result.moe_aux_loss
    return metrics


class _MemoryWatch:
    """The memory model's predicted peak per rank (memory/check.py), logged at start-up and compared with the
    measured peak once two steps have run (Adam's state exists from the first)."""

    def __init__(self) -> None:
        self.baseline = reset_peak()  # before the model is built
        self.predicted: Optional[float] = None

    def predict(self, cfg: Config, model: TrainingModel, world: int) -> str:
        # the optimizer as built: unsharded with one replica, or kept from a resumed checkpoint
        as_built = replace(cfg, parallel=replace(cfg.parallel, distributed_optimizer=model.distributed_optimizer))
        try:
            line, estimate = predicted_line(as_built, model.args, world)
        except (ValueError, KeyError, NotImplementedError) as err:  # a setup the model does not cover: say so
            return f"memory model: no prediction for this setup ({err})"
        self.predicted = estimate.peak
        return line

    def check(self) -> Optional[str]:
        """Collective. The comparison line (a WARNING above 20%), or None without a prediction."""
        if self.predicted is None:
            return None
        peak = torch.tensor([float(measured_peak_bytes(self.baseline))], device=current_device())
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return compare_with_measured(self.predicted, float(peak[0])).message


def _due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (checkpoint, evaluation) runs after ``step``: every N steps and at the end."""
    return bool(every) and step % every == 0 or step == last


def _train(cfg: Config, resume: bool) -> TrainSummary:
    from megatron_sft.parallel import init_distributed, init_model_parallel

    quiet_library_warnings()
    rank, world = init_distributed()
    par = cfg.parallel
    init_model_parallel(par.tensor, par.pipeline, par.virtual_pipeline, seed=cfg.train.seed, expert_parallel=par.expert)
    torch.manual_seed(cfg.train.seed)
    main, out = rank == 0, Path(cfg.output_dir)
    existing = _resume_checkpoint(cfg, resume, main)
    if main:  # a resumed run is not complete until it finishes again (job scripts requeue on its absence)
        (out / COMPLETED_MARKER).unlink(missing_ok=True)
    layout = _data_parallel_layout(cfg, world)
    run = _load_run_data(cfg, layout)
    memory = _MemoryWatch()
    model = build_training_model(cfg, run.total_steps,
                                 saved_distributed_optimizer=saved_distributed_optimizer(existing, par.distributed_optimizer))
    memory_line = memory.predict(cfg, model, world)
    objective = parse_objective(cfg.objective.name)
    runner = StepRunner(model, objective, cfg.objective)
    start_step = 0
    if existing is not None:
        state = load_training_checkpoint(model, existing)
        run.sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        runner.running_mean_p = state.get("running_mean_p")
    log = RunLogger(out, cfg.log, run.run_steps, start_step, enabled=main, run_config=cfg.to_dict())
    if main:
        cfg.save(out / "config.yaml")
        for line in _start_up_lines(cfg, layout, run, model, objective, existing) + [memory_line]:
            log.print(line)
    loop = _TrainingLoop(cfg, layout, run, model, runner, log, existing, memory)
    loop.run(start_step)
    exported = None
    if not loop.stopped and cfg.checkpoint.export_hf and loop.saved is not None:
        exported = export_hf(loop.saved, out / "hf", main)
        log.print(f"exported HF model to {exported}")
    log.close()
    summary = loop.summary(exported)
    if main and not loop.stopped:
        _write_completed_marker(out, summary)
    return summary


class _TrainingLoop:
    """step -> log -> evaluate -> save -> stop, until the run's last step or a stop signal."""

    def __init__(self, cfg: Config, layout: _Layout, run: _RunData, model: TrainingModel, runner: StepRunner,
                 log: RunLogger, existing: Optional[Path], memory: _MemoryWatch) -> None:
        self.cfg, self.layout, self.run_data, self.model, self.runner, self.log = cfg, layout, run, model, runner, log
        self.memory = memory
        self.saved: Optional[Path] = existing
        self.stopped = False
        self.step = 0
        self.losses: list[float] = []
        self.first_p: Optional[float] = None
        self.last_p: Optional[float] = None
        self.throughput = _Throughput(model, run.train, layout.world)

    def run(self, start_step: int) -> None:
        stop, run, t = _StopSignal(), self.run_data, self.cfg.train
        self.step = start_step
        self.stopped = stop.agreed()  # a stop during start-up: exit before the first step, nothing new to save
        if self.stopped:
            self.log.print(f"received signal {stop.received or 'on another rank'} during start-up: exiting before "
                           f"step {self.step + 1} with nothing new to save. Continue with --resume.")
        while not self.stopped and self.step < run.run_steps:
            epoch, epoch_step, rows = run.sampler.next_step()
            result = self.runner.train_step(run.shape.micro_batches([run.train.rows[i] for i in rows]), t.on_nonfinite)
            self.step += 1
            self._record(result)
            if self.step == min(start_step + 2, run.run_steps):
                self._log_memory()
            metrics = _step_metrics(result, self.throughput)
            if run.eval is not None and t.eval_every_steps and _due(self.step, t.eval_every_steps, run.run_steps):
                metrics.update({f"eval/{k}": v for k, v in self._evaluate().items()})
            self.log.log_step(self.step, run.run_steps, epoch + (epoch_step + 1) / run.sampler.steps_per_epoch, metrics)
            self.stopped = stop.agreed()
            if self.stopped or _due(self.step, self.cfg.checkpoint.every_steps, run.run_steps):
                self._save()
            if self.stopped:
                self.log.print(f"received signal {stop.received or 'on another rank'}: checkpoint saved at step "
                               f"{self.step}; exiting. Continue with --resume.")

    def _log_memory(self) -> None:
        line = self.memory.check()  # collective
        if line:
            self.log.print(line)

    def _record(self, result) -> None:
        self.losses.append(result.loss)
        self.first_p = result.mean_p if self.first_p is None else self.first_p
        self.last_p = result.mean_p

    def _evaluate(self) -> dict:
        par = self.cfg.parallel
        return evaluate_rows(self.runner, self.run_data.shape, self.run_data.eval, self.layout.dp, self.layout.dp_rank,
                             par.pipeline if par.virtual_pipeline else 1)

    def _save(self) -> None:
        c, run = self.cfg.checkpoint, self.run_data
        state = {"sampler": run.sampler.state_dict(), "data_rows": len(run.train.rows),
                 "running_mean_p": self.runner.running_mean_p}
        self.saved = save_training_checkpoint(self.model, Path(self.cfg.output_dir) / "checkpoints", self.step, state,
                                              run.tokenizer_dir, c.save_optimizer, c.keep_last)
        self.log.print(f"saved checkpoint {self.saved}")

    def summary(self, exported: Optional[Path]) -> TrainSummary:
        losses = self.losses
        return TrainSummary(
            steps=self.step, first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
            first_mean_p=self.first_p, last_mean_p=self.last_p, checkpoint=str(self.saved) if self.saved else None,
            export=str(exported) if exported else None, stopped_by_signal=self.stopped, losses=losses,
        )


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

    indices, real = data_parallel_share(len(data.rows), dp, dp_rank, shape.micro_batch_size * multiple)
    rows = [data.rows[i] if n < real else dataclasses.replace(data.rows[i], target_mask=[0] * len(data.rows[i]))
            for n, i in enumerate(indices)]
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
