"""Training speed on one GPU: megatron-sft vs a plain transformers loop, same model, rows and objective.

    python benchmarks/gpu_train_bench.py                          # CUDA: Qwen2.5-1.5B shape, packed rows of 4096
    python benchmarks/gpu_train_bench.py --backends torch,te      # also Transformer Engine when installed
    python benchmarks/gpu_train_bench.py --shape tiny --seq 256   # the same code path on CPU (plumbing check)
    python benchmarks/gpu_train_bench.py --json report.json       # also write the figures as JSON

A random model of the chosen shape (bf16 on CUDA, fp32 on CPU) is trained for --warmup + --steps steps with
the -p objective on generated rows whose lengths vary from --seq/8 to --seq/2 tokens:
- megatron-sft: TP=1, rows packed into --seq tokens (per-sequence attention), one packed row per micro-batch,
  for each attention backend in --backends;
- transformers: the HF model with ``attn_implementation="sdpa"``, micro-batches of --hf-micro-batch sequences
  padded to their longest, loss mean(1 - p) over response tokens, AdamW; the same rows in the same order, about
  the same tokens per step.
Each trainer runs in its own process (a clean peak). Reported per trainer: non-padding tokens/s (median of the
timed steps), MFU (training FLOPs of the real sequence lengths, attention included, over the GPU's dense bf16
peak) and peak memory (``torch.cuda.max_memory_allocated``; CPU: peak RSS). Ratios are against transformers.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # HF config fields of the real models (random weights)
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
}


def write_rows(path: Path, seq: int, count: int, seed: int = 0) -> Path:
    """Rows of space-separated words (one token each for the tiny word-level tokenizer), 16-token prompts and
    responses of seq/8 .. seq/2 tokens: long enough that attention matters, short enough to pack."""
    rng = random.Random(seed)
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)]  # single letters: one token each
    with path.open("w") as f:
        for _ in range(count):
            prompt = " ".join(rng.choices(words, k=16))
            response = " ".join(rng.choices(words, k=rng.randint(seq // 8, seq // 2)))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def prepare(root: Path, shape: str, seq: int, rows: int) -> None:
    """The random HF model, its megatron-sft checkpoint and the rows, shared by both trainers."""
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.launch import run_local_workers
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    save_tiny_hf_model(root / "hf", "qwen2-tied-gqa", seed=0, dtype=dtype,
                       config_overrides={**SHAPES[shape], "max_position_embeddings": max(seq, 4096)})
    run_local_workers(convert_hf_to_mcore, 1, root / "hf", root / "ckpt", timeout_s=1800)
    write_rows(root / "rows.jsonl", seq, rows)


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _examples(root: Path, seq: int) -> list:
    from transformers import AutoTokenizer

    from megatron_sft.config import DataConfig
    from megatron_sft.data.formatting import Formatter
    from megatron_sft.data.sources import read_rows

    tokenizer = AutoTokenizer.from_pretrained(str(root / "hf"))
    formatter = Formatter(tokenizer, DataConfig(max_length=seq, template="plain"))
    return [formatter(row) for row in read_rows(root / "rows.jsonl")]


def attention_length(lengths: list[int]) -> float:
    """The sequence length that makes causal attention's FLOPs per token right for rows of these lengths:
    sum(len^2) / sum(len) (attention work grows with each sequence's own length, packed or not)."""
    return sum(n * n for n in lengths) / max(sum(lengths), 1)


def flops_per_token(root: Path, lengths: list[int]) -> float:
    from megatron_sft.model.checkpoint import read_model_args
    from megatron_sft.train.logger import flops_per_token as model_flops_per_token

    return model_flops_per_token(read_model_args(root / "ckpt"), attention_length(lengths))


def run_ours(root: Path, seq: int, steps: int, warmup: int, backend: str, rows_per_step: int) -> dict:
    """megatron-sft in this process: median tokens/s of the timed steps (from its metrics.jsonl), peak memory."""
    from megatron_sft.config import load_config
    from megatron_sft.train.entry import launch_training

    out = root / f"ours_{backend}"
    overrides = [f"output_dir={out}", f"model.checkpoint={root / 'ckpt'}", f"data.train={root / 'rows.jsonl'}",
                 "data.template=plain", f"data.max_length={seq}", "data.packing=true", "train.micro_batch_size=1",
                 f"train.global_batch_size={rows_per_step}", "train.epochs=1000", f"train.max_steps={warmup + steps}",
                 "objective.name=neg_p", f"model.attention_backend={backend}", "checkpoint.export_hf=false",
                 "checkpoint.save_optimizer=false", "log.progress_bar=false", "log.tensorboard=false",
                 "log.every_steps=1000", "optim.lr=1e-5"]
    launch_training(load_config(None, overrides))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records), "peak_bytes": _peak_bytes()}


def hf_step(model, optimizer, batch: list, pad: int, device: str) -> int:
    """One optimizer step of the transformers loop over ``batch`` (a list of micro-batches of formatted
    examples), padded per micro-batch: HF forward, log_softmax + gather for p, mean(1 - p) over the step's
    response tokens, clipping at 1.0, AdamW. Returns its non-padding tokens (train_bench.py uses it too)."""
    tokens = 0
    counts = sum(sum(e.target_mask[1:]) for micro in batch for e in micro)
    for micro in batch:
        width = max(len(e) for e in micro)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e)) for e in micro], device=device)
        mask = torch.tensor([e.target_mask + [0] * (width - len(e)) for e in micro], device=device)
        attention = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in micro], device=device)
        tokens += int(attention.sum())
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        ((1 - logp.exp()) * mask[:, 1:]).sum().div(counts).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return tokens


def run_transformers(root: Path, seq: int, steps: int, warmup: int, micro_batch: int, rows_per_step: int) -> dict:
    """The plain loop with SDPA attention; about seq x rows_per_step tokens per step, like ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pad = AutoTokenizer.from_pretrained(str(root / "hf")).pad_token_id
    model = AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    examples, cursor, speeds = _examples(root, seq), 0, []
    for step in range(warmup + steps):
        batch, budget = [], seq * rows_per_step
        while budget > 0:
            micro = [examples[(cursor + i) % len(examples)] for i in range(micro_batch)]
            cursor += micro_batch
            budget -= sum(len(e) for e in micro)
            batch.append(micro)
        started = time.perf_counter()
        tokens = hf_step(model, optimizer, batch, pad, device)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            speeds.append(tokens / (time.perf_counter() - started))
    return {"tokens_per_s": statistics.median(speeds), "peak_bytes": _peak_bytes()}


def _worker(args: argparse.Namespace) -> None:
    root = Path(args.root)
    kind, _, backend = args.worker.partition(":")
    if kind == "ours":
        result = run_ours(root, args.seq, args.steps, args.warmup, backend, args.rows_per_step)
    else:
        result = run_transformers(root, args.seq, args.steps, args.warmup, args.hf_micro_batch, args.rows_per_step)
    print(json.dumps(result))


def _in_own_process(args: argparse.Namespace, root: Path, worker: str) -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--root", str(root), "--seq", str(args.seq),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--rows-per-step", str(args.rows_per_step),
               "--hf-micro-batch", str(args.hf_micro_batch)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{worker} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> dict:
    """Both trainers on the same model and rows; the figures with MFU and ratios against transformers."""
    from megatron_sft.train.logger import peak_flops

    with tempfile.TemporaryDirectory(prefix="gpu_train_bench_") as tmp:
        root = Path(tmp)
        prepare(root, args.shape, args.seq, args.rows)
        lengths = [len(e) for e in _examples(root, args.seq)]
        per_token = flops_per_token(root, lengths)
        results = {"transformers (sdpa)": _in_own_process(args, root, "transformers")}
        for backend in args.backends.split(","):
            results[f"megatron-sft ({backend})"] = _in_own_process(args, root, f"ours:{backend}")
    peak = peak_flops()
    reference = results["transformers (sdpa)"]["tokens_per_s"]
    for figures in results.values():
        figures["mfu"] = figures["tokens_per_s"] * per_token / peak if peak else None
        figures["vs_transformers"] = figures["tokens_per_s"] / reference
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"shape": args.shape, "seq": args.seq, "device": device, "flops_per_token": per_token,
            "attention_length": attention_length(lengths), "trainers": results}


def markdown(report: dict) -> str:
    lines = [f"{report['shape']}-shaped, packed rows of {report['seq']} tokens, -p, {report['device']}", "",
             "| trainer | tokens/s | vs transformers | MFU | peak GiB |", "|---|---:|---:|---:|---:|"]
    for name, f in report["trainers"].items():
        mfu = f"{f['mfu']:.1%}" if f["mfu"] is not None else "n/a"
        lines.append(f"| {name} | {f['tokens_per_s']:.0f} | {f['vs_transformers']:.2f} | {mfu} | "
                     f"{f['peak_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b" if gpu else "tiny")
    parser.add_argument("--seq", type=int, default=4096 if gpu else 256, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=512, help="generated training rows")
    parser.add_argument("--rows-per-step", type=int, default=8, help="packed rows of --seq tokens per step")
    parser.add_argument("--hf-micro-batch", type=int, default=4, help="sequences per micro-batch of the HF loop")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--backends", default="torch", help="megatron-sft attention backends, comma-separated")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    report = compare(args)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
