"""Training throughput: megatron-sft's trainer vs. a plain transformers training step, same model and objective.

Both train a random Qwen2-shaped model on the same generated rows with the -p objective (response tokens
only), AdamW, the same micro-batch and global batch. Reported: non-padding tokens per second (median over
the timed steps, after warm-up steps) and their ratio, measured side by side in one run.

    python benchmarks/train_bench.py                 # CPU: tiny model, 1 process (and TP=2 on 2 processes)
    python benchmarks/train_bench.py --hidden 512    # bigger model
    python benchmarks/train_bench.py --hidden 512 --backends local,torch --packing-off-only   # attention backends

On a GPU (when one is present) it also trains a Qwen2.5-0.5B-shaped model (random weights, bf16, packed
rows of 2048 tokens) with our trainer and prints its tokens/s and MFU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gpu_train_bench import hf_step  # the same transformers step, beside this script


def reference_tokens_per_s(hf_dir: Path, rows_file: Path, max_length: int, micro: int, global_batch: int,
                           steps: int, warmup: int, lr: float) -> float:
    """The plain transformers loop: HF forward, log_softmax + gather for p, loss = mean(1 - p), AdamW."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sft.config import DataConfig
    from megatron_sft.data.formatting import Formatter
    from megatron_sft.data.sources import read_rows

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).train()
    formatter = Formatter(tokenizer, DataConfig(max_length=max_length))
    examples = [formatter(row) for row in read_rows(rows_file)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    timings = []
    cursor = 0
    for step in range(warmup + steps):
        started = time.perf_counter()
        batch_rows = [examples[(cursor + i) % len(examples)] for i in range(global_batch)]
        cursor += global_batch
        micro_batches = [batch_rows[start:start + micro] for start in range(0, global_batch, micro)]
        tokens = hf_step(model, optimizer, micro_batches, tokenizer.pad_token_id, device)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= warmup:
            timings.append(tokens / (time.perf_counter() - started))
    return statistics.median(timings)


def ours_tokens_per_s(out: Path, nproc: int, overrides: list[str], warmup: int) -> tuple[float, float | None]:
    from megatron_sft.train.entry import launch_training
    from megatron_sft.config import load_config

    launch_training(load_config(None, [f"output_dir={out}", *overrides]), nproc=nproc)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][warmup:]
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    return statistics.median(r["tokens_per_s"] for r in records), (statistics.median(mfu) if mfu else None)


QWEN25_05B_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)


def gpu_mfu(root: Path, steps: int, warmup: int) -> tuple[float, float | None]:
    """Our trainer on a Qwen2.5-0.5B-shaped model: median tokens/s and MFU (GPU only)."""
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.toy.files import write_jsonl
    from megatron_sft.toy.letter_task import shift_task_rows
    from megatron_sft.launch import run_local_workers
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    save_tiny_hf_model(root / "hf05", "qwen2-tied-gqa", seed=0, dtype=torch.bfloat16, config_overrides=QWEN25_05B_SHAPE)
    run_local_workers(convert_hf_to_mcore, 1, root / "hf05", root / "ckpt05", timeout_s=1200)
    rows = write_jsonl(root / "rows05.jsonl", shift_task_rows(20000, seed=0))
    overrides = [f"model.checkpoint={root / 'ckpt05'}", f"data.train={rows}", "data.max_length=2048",
                 "train.global_batch_size=16", "train.micro_batch_size=4", "train.epochs=10",
                 f"train.max_steps={warmup + steps}", "objective.name=neg_p", "checkpoint.export_hf=false",
                 "checkpoint.save_optimizer=false", "log.progress_bar=false", "log.tensorboard=false",
                 "log.every_steps=1000"]
    return ours_tokens_per_s(root / "gpu05", 1, overrides, warmup)


def _trainer_runs(args, root: Path, rows: Path, common: list[str], shape: tuple) -> list:
    """(name, run(repeat) -> (tokens/s, MFU)) for the transformers loop first, then each of our trainers."""
    max_length, micro, global_batch, lr = shape
    runs = [("transformers loop (1 process)", lambda r: (reference_tokens_per_s(
        root / "hf", rows, max_length, micro, global_batch, args.steps, args.warmup, lr), None))]

    def ours(tag: str, nproc: int, overrides: list[str]):
        return lambda r: ours_tokens_per_s(root / f"{tag}_r{r}", nproc, common + overrides, args.warmup)

    for backend in args.backends.split(","):
        runs.append((f"megatron-sft TP=1, packing off, attention {backend}",
                     ours(f"tp1_{backend}", 1, ["data.packing=false", f"model.attention_backend={backend}"])))
    if not args.packing_off_only:
        runs.append(("megatron-sft TP=1, packing on", ours("tp1p", 1, [])))
    if not args.packing_off_only and (not torch.cuda.is_available() or torch.cuda.device_count() >= 2):
        runs.append(("megatron-sft TP=2 (2 processes), packing on",
                     ours("tp2", 2, ["parallel.tensor=2", "parallel.sequence_parallel=true"])))
    return runs


def _print_table(samples: dict[str, list[tuple[float, float | None]]]) -> None:
    """Median tokens/s per trainer, its ratio to the transformers loop's median and, over several repeats, the
    range of the ratios each repeat measured against that repeat's transformers loop."""
    reference = [tps for tps, _ in next(iter(samples.values()))]
    repeats = len(reference)
    print(f"{'trainer':46} {'tokens/s':>10} {'ratio vs transformers':>22}" + ("   per-repeat ratios" if repeats > 1 else ""))
    for name, values in samples.items():
        tps = statistics.median(v for v, _ in values)
        mfu = [m for _, m in values if m]
        ratios = [v / ref for (v, _), ref in zip(values, reference)]
        print(f"{name:46} {tps:10.0f} {tps / statistics.median(reference):22.2f}"
              + (f"   {min(ratios):.2f}-{max(ratios):.2f}" if repeats > 1 else "")
              + (f"   MFU {statistics.median(mfu):.1%}" if mfu else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--backends", default="auto",
                        help="comma-separated model.attention_backend values for the TP=1 packing-off rows")
    parser.add_argument("--packing-off-only", action="store_true", help="skip the packing-on and TP=2 rows")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every trainer this many times, our trainers in alternating order (ABBA); "
                             "report the median tokens/s and the range of the per-repeat ratios")
    args = parser.parse_args()

    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.toy.files import write_jsonl
    from megatron_sft.toy.letter_task import shift_task_rows
    from megatron_sft.launch import run_local_workers
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    micro, global_batch, max_length, lr = 8, 32, 64, 1e-4
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        root = Path(tmp)
        save_tiny_hf_model(root / "hf", "qwen2-tied-gqa", layers=args.layers, hidden=args.hidden, seed=0)
        run_local_workers(convert_hf_to_mcore, 1, root / "hf", root / "ckpt", timeout_s=600)
        rows = write_jsonl(root / "rows.jsonl", shift_task_rows(args.rows, seed=0))
        total = args.warmup + args.steps
        common = [f"model.checkpoint={root / 'ckpt'}", f"data.train={rows}", f"data.max_length={max_length}",
                  f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro}", "train.epochs=100",
                  f"train.max_steps={total}", f"optim.lr={lr}", "objective.name=neg_p", "checkpoint.export_hf=false",
                  "checkpoint.save_optimizer=false", "log.progress_bar=false", "log.tensorboard=false", "log.every_steps=1000"]
        runs = _trainer_runs(args, root, rows, common, (max_length, micro, global_batch, lr))
        samples: dict[str, list[tuple[float, float | None]]] = {name: [] for name, _ in runs}
        for repeat in range(args.repeats):  # our trainers in reverse order on odd repeats: drift cancels out
            ours = runs[1:] if repeat % 2 == 0 else runs[:0:-1]
            for name, run in [runs[0], *ours]:
                samples[name].append(run(repeat))

        gpu = gpu_mfu(root, args.steps, args.warmup) if torch.cuda.is_available() and not args.packing_off_only else None

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"model: Qwen2-shaped, {args.layers} layers, hidden {args.hidden}, vocab 250; objective -p; "
          f"global batch {global_batch} rows, micro batch {micro}, max length {max_length}; {device}")
    _print_table(samples)
    if gpu is not None:
        tps, mfu = gpu
        print(f"Qwen2.5-0.5B-shaped, bf16, packed rows of 2048, 1 GPU: {tps:.0f} tokens/s, MFU "
              + (f"{mfu:.1%}" if mfu is not None else "n/a (unknown GPU peak)"))


if __name__ == "__main__":
    main()
