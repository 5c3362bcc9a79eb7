"""Per-step metrics: a log line, a progress bar, TensorBoard, optional W&B, and metrics.jsonl.

Only global rank 0 writes. The log line carries what the paper's diagnostic needs next to the usual:
loss, mean target-token p over response tokens, the selected-token fraction (thresholds/percentiles),
lr, grad norm, tokens/s and MFU (on GPU, from the dense model FLOPs).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_sft.model.args import ModelArgs
from megatron_sft.config import LogConfig
from megatron_sft.train.metrics_resume import cut_metrics_back

# dense bf16 tensor-core peak per GPU (FLOP/s), by device-name substring
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(args: ModelArgs, mean_sequence_length: float) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + causal attention scores/values (fwd + bwd)."""
    from megatron_sft.model.architectures import parameter_count

    # the parameters one token runs through (a mixture of experts: its top-k experts), from the architecture
    # table; the input embedding is a lookup, not a matmul, but the LM head's matmul always runs (tied or not)
    embedding = args.vocab_size * args.hidden_size
    matmul_params = parameter_count(args, active=True) - (0 if args.tie_word_embeddings else embedding)
    attention = 6 * args.num_layers * args.num_attention_heads * args.kv_channels * mean_sequence_length
    return 6 * matmul_params + attention


class RunLogger:
    def __init__(self, output_dir: Path, cfg: LogConfig, total_steps: int, start_step: int, enabled: bool,
                 run_config: Optional[dict] = None):
        self.cfg, self.enabled = cfg, enabled
        self.bar = self.tb = self.wandb = None
        self.metrics_file = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        cut_metrics_back(output_dir / "metrics.jsonl", start_step)  # a resume logs the later steps again
        self.metrics_file = (output_dir / "metrics.jsonl").open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides an earlier session's events from this step on
            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("log.wandb=true but wandb is not installed: pip install 'megatron-sft[wandb]'") from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=run_config, dir=str(output_dir))
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=None)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def log_step(self, step: int, total: int, epoch: float, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "epoch": round(epoch, 4), **metrics}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                if self.tb is not None:
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("eval/") else key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", p=f"{metrics.get('mean_p', float('nan')):.3f}")
        if step % self.cfg.every_steps == 0 or step == total:
            self.print(format_line(step, total, epoch, metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.metrics_file is not None:
            self.metrics_file.close()


def format_line(step: int, total: int, epoch: float, m: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}", f"epoch {epoch:.2f}"]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}")
    if "mean_p" in m:
        parts.append(f"mean_p {m['mean_p']:.4f}")
    if m.get("objective"):
        parts.append(f"objective {m['objective']}")
    if m.get("selected_fraction") is not None and m["selected_fraction"] < 1.0:
        parts.append(f"selected {m['selected_fraction']:.3f}")
    if m.get("moe_aux_loss") is not None:
        parts.append(f"moe_aux_loss {m['moe_aux_loss']:.4g}")
    if "lr" in m:
        parts.append(f"lr {m['lr']:.3e}")
    if m.get("grad_norm") is not None:
        parts.append(f"grad_norm {m['grad_norm']:.4g}")  # 4 significant digits (metrics.jsonl: full)
    if "tokens_per_s" in m:
        parts.append(f"tok/s {m['tokens_per_s']:.0f}")
    parts.append(f"mfu {m['mfu']:.1%}" if m.get("mfu") is not None else "mfu n/a (cpu)")
    if m.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    for key in ("eval/loss", "eval/mean_p"):
        if key in m:
            parts.append(f"{key} {m[key]:.4f}")
    return " | ".join(parts)
