"""Helpers for the trainer tests: a tiny converted model + task, configs, and workers that read results back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_sft.train.entry import train_worker  # noqa: F401 - the workers the tests launch
from megatron_sft.config import Config, load_config


def make_tiny_run_inputs(root: Path, rows: int = 48, layers: int = 4, variant: str = "qwen2-tied-gqa") -> tuple[Path, Path]:
    """(megatron checkpoint of a tiny random model (``variant`` of toy.tiny_models; Qwen2 by default) with 4 layers,
    train.jsonl of the shift task)."""
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.toy.files import write_jsonl
    from megatron_sft.toy.letter_task import shift_task_rows
    from megatron_sft.launch import run_local_workers
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    save_tiny_hf_model(root / "hf", variant, layers=layers, hidden=64, seed=0)
    run_local_workers(convert_hf_to_mcore, 1, root / "hf", root / "ckpt", timeout_s=300)  # own process group
    return root / "ckpt", write_jsonl(root / "train.jsonl", shift_task_rows(rows, seed=5))


def tiny_cli_args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """`megatron-sft train` overrides of a short constant-LR run on the tiny model without an HF export;
    ``extra`` (the run length, checkpoint cadence, ...) comes last and wins."""
    return [f"output_dir={out}", f"model.checkpoint={ckpt}", f"data.train={data}", "data.max_length=32",
            "train.global_batch_size=8", "train.micro_batch_size=2", "optim.lr=1e-3", "optim.warmup_steps=0",
            "optim.schedule=constant", "checkpoint.export_hf=false", "log.progress_bar=false", *extra]


def tiny_config(ckpt: Path, data: Path, out: Path, *overrides: str) -> Config:
    """A 2-step run on the tiny model; the Adam eps is large so that near-zero gradients are not amplified
    into sign flips (layouts differ by float rounding; this keeps weight comparisons meaningful)."""
    base = [
        f"output_dir={out}", f"model.checkpoint={ckpt}", f"data.train={data}", "data.max_length=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.epochs=1", "train.max_steps=2",
        "optim.lr=1e-3", "optim.eps=1e-4", "optim.warmup_steps=0", "optim.schedule=constant",
        "checkpoint.export_hf=false", "log.progress_bar=false", "log.tensorboard=false", "objective.name=neg_p",
        f"data.eval={data}", "train.eval_every_steps=2",
    ]
    return load_config(None, base + list(overrides))


def logged(output_dir: str | Path, key: str) -> list[float]:
    """One metric per step from a run's metrics.jsonl (e.g. grad_norm)."""
    import json

    return [json.loads(line)[key] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def eval_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """The eval/* values logged in a run's metrics.jsonl, in step order."""
    import json

    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("eval/")} for r in records if "eval/loss" in r]


def per_token_loss_worker(ckpt: str, data: str, packing: bool, tensor_parallel: int, max_length: int = 48,
                          use_thd: bool = False, leak_across_sequences: bool = False) -> dict[str, Any]:
    """Per-token f(p) (objective nll) of every example, keyed by its FILE:ROW, from our model's forward with
    packed (block-diagonal mask, or THD ``PackedSeqParams`` with ``use_thd``) or unpacked rows.

    ``leak_across_sequences``: the negative control, attention told that each packed row is one sequence (a
    packing bug), so a test can show its tolerance would catch one."""
    from transformers import AutoTokenizer

    from megatron_sft.loss import vocab_parallel_objective_loss
    from megatron_sft.model.checkpoint import TOKENIZER_DIR, load_model
    from megatron_sft.parallel import init_model_parallel
    from megatron_sft.model.attention import attention_inputs
    from megatron_sft.data.batches import BatchShape, load_rows
    from megatron_sft.config import DataConfig

    init_model_parallel(tensor_parallel, 1)
    model, args = load_model(ckpt)
    model.eval()
    device = next(model.parameters()).device
    tokenizer = AutoTokenizer.from_pretrained(str(Path(ckpt) / TOKENIZER_DIR))
    rows = load_rows([data], DataConfig(max_length=max_length, packing=packing), tokenizer).rows
    shape = BatchShape(micro_batch_size=4, pad_id=tokenizer.pad_token_id, pad_to_multiple=tensor_parallel, fixed_length=None)
    result: dict[str, Any] = {}
    for start in range(0, len(rows), 4):
        chunk = rows[start : start + 4]
        batch = {k: v.to(device) for k, v in shape.collate(chunk).items()}
        rows_shape = batch["tokens"].shape
        seen = dict(batch, sequence_ids=torch.where(batch["sequence_ids"] >= 0, 0, -1)) if leak_across_sequences else batch
        flat, mask, packed = attention_inputs(seen, use_thd=use_thd)
        with torch.no_grad():
            logits = model(flat["tokens"], flat["position_ids"], mask, packed_seq_params=packed)
            out = vocab_parallel_objective_loss(logits, flat["labels"], "nll", flat["loss_mask"], vocab_size=args.vocab_size)
        token_loss, trained = out.per_token_loss.reshape(rows_shape).float().cpu(), out.valid.reshape(rows_shape).cpu()
        batch = {k: v.cpu() for k, v in batch.items()}
        for b, row in enumerate(chunk):
            for seq, where in enumerate(row.sources):
                positions = (batch["sequence_ids"][b] == seq).nonzero().squeeze(1)
                result[where] = {
                    "loss": token_loss[b, positions].clone(),
                    "trained": trained[b, positions].clone(),
                    "labels": batch["labels"][b, positions].clone(),
                }
    return result


def checkpoint_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every full (unsharded) tensor of a checkpoint's model/, read with torch.distributed.checkpoint alone.

    Keys are megatron-core's global sharded keys (layers stacked on a leading dimension), so checkpoints
    saved at different TP/PP layouts compare directly, in this process, without building a model.
    """
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(Path(ckpt_dir) / "model"), f"{tmp}/state.pt")
        state = torch.load(f"{tmp}/state.pt", weights_only=False)
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
