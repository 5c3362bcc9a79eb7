"""The memory model's prediction for a training run, and its check against the measured peak.

Why: a prediction nobody checks drifts from reality unnoticed. The trainer logs :func:`predicted_line` at
start-up and, after the first steps, :func:`compare_with_measured` on :func:`measured_peak_bytes` (the peak
since :func:`reset_peak`, called before the model is built): ``torch.cuda.max_memory_allocated`` on GPU, the
process's peak RSS above its pre-model RSS on CPU. A difference above 20% is a warning, not an error.
"""

from __future__ import annotations

import importlib.util
import resource
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_sft.memory.model import GIB, Estimate, Layout, ModelShape, cpu_layout, estimate

WARN_ABOVE = 0.20


def _status_bytes(field: str) -> Optional[int]:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in bytes (None where there is no procfs)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak() -> int:
    """Start measuring: reset the peak (CUDA allocator stats, or the process's VmHWM) and return the baseline
    in bytes that :func:`measured_peak_bytes` subtracts."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass  # no procfs: the peak then includes whatever came before
    return _status_bytes("VmRSS") or 0


def measured_peak_bytes(baseline: int) -> int:
    """The peak since :func:`reset_peak`, above ``baseline``."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()) - baseline
    peak = _status_bytes("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - baseline


def layout_from_config(config: Any, world_size: int, on_gpu: Optional[bool] = None) -> Layout:
    """The memory-model layout of a training Config on ``world_size`` ranks: the GPU path (bf16; scores kept
    only by the local attention backend, fused norms and Adam with Transformer Engine, the SwiGLU fusion unless
    turned off) or the CPU path (fp32, no fusions)."""
    par, train = config.parallel, config.train
    dp = max(1, world_size // (par.tensor * par.pipeline))
    settings = dict(
        tensor=par.tensor, pipeline=par.pipeline, data=dp, expert=getattr(par, "expert", 1) or 1, virtual=par.virtual_pipeline,
        sequence_parallel=par.tensor > 1 if par.sequence_parallel is None else par.sequence_parallel,
        seq=config.data.max_length, micro_batch=train.micro_batch_size,
        num_microbatches=max(1, train.global_batch_size // (train.micro_batch_size * dp)),
        recompute=config.model.recompute, distributed_optimizer=par.distributed_optimizer,
        fused_output_loss=config.model.fused_output_loss, loss_chunk_tokens=config.model.loss_chunk_tokens,
    )
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if not on_gpu:
        return cpu_layout(**settings)
    te = importlib.util.find_spec("transformer_engine") is not None
    backend = config.model.attention_backend
    backend = ("te" if te else "torch") if backend == "auto" else backend  # flash-attn, when found, keeps no scores either
    swiglu = config.model.swiglu_fusion is not False  # null: on with CUDA (model/fusions.py)
    return Layout(attention="materialized" if backend == "local" else "flash", fused_norm=te, fused_adam=te,
                  fused_swiglu=swiglu, **settings)


def predicted_line(config: Any, model_args: Any, world_size: Optional[int] = None) -> tuple[str, Estimate]:
    """(one log line with the predicted peak per rank and its largest terms, the estimate). ``model_args``: the
    checkpoint's ModelArgs; ``world_size`` defaults to the initialised process group's."""
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_initialized() else 1
    est = estimate(ModelShape.from_args(model_args), layout_from_config(config, world_size))
    top = sorted(est.terms, key=lambda t: t.bytes, reverse=True)[:3]
    parts = ", ".join(f"{t.name} {t.bytes / GIB:.2f}" for t in top)
    line = (f"memory model: predicted peak {est.peak / GIB:.2f} GiB per rank ({est.layout.name()}, {est.stage} stage, "
            f"at {est.peak_phase}; largest terms GiB: {parts})")
    return line, est


@dataclass(frozen=True)
class MemoryComparison:
    predicted: float
    measured: float
    relative: float  # predicted / measured - 1
    warn: bool
    message: str


SMALLEST_COMPARED = GIB  # below this, allocator and library overheads dominate a process's peak


def compare_with_measured(predicted_bytes: float, measured_bytes: float, warn_above: float = WARN_ABOVE) -> MemoryComparison:
    """Predicted vs measured peak; ``warn`` (and a message saying so) when they differ by more than ``warn_above``
    and the larger of the two is at least ``SMALLEST_COMPARED`` (a tiny test model is all overhead)."""
    if measured_bytes <= 0:
        return MemoryComparison(predicted_bytes, measured_bytes, float("nan"), False,
                                f"memory: predicted peak {predicted_bytes / GIB:.2f} GiB; no measured peak on this platform")
    relative = predicted_bytes / measured_bytes - 1
    warn = abs(relative) > warn_above and max(predicted_bytes, measured_bytes) >= SMALLEST_COMPARED
    message = (f"memory: predicted peak {predicted_bytes / GIB:.2f} GiB, measured {measured_bytes / GIB:.2f} GiB "
               f"({relative:+.0%})")
    if warn:
        message = (f"WARNING {message}: more than {warn_above:.0%} apart, so plans made with the memory model "
                   "(megatron-sft plan) may not fit or may waste GPUs for this setup")
    return MemoryComparison(predicted_bytes, measured_bytes, relative, warn, message)
