"""Output layer + loss, forward + backward: the fused chunked path vs megatron-core's vs ours unfused.

Same inputs for all three (TOKENS hidden states of size HIDDEN, an output weight [VOCAB, HIDDEN], targets, a
response mask over 70% of the tokens as in SFT), at TP=1:
  fused     megatron_sft.fused_output_loss.fused_output_objective_loss (objective --objective, default neg_p):
            logits of --chunk tokens at a time, never whole
  megatron  hidden @ W^T (megatron-core's output layer matmul) -> tensor_parallel.vocab_parallel_cross_entropy
  unfused   hidden @ W^T -> megatron_sft.loss.vocab_parallel_objective_loss (what model.fused_output_loss=false runs)
As in the trainer, the weight has megatron-core DDP's fp32 gradient buffer (``main_grad``, an input like the
weight itself) and each backward ends with what DDP's gradient hook does: add ``weight.grad`` into it unless
the gradient is already there (the fused path writes it there directly; the others allocate the [V, h] weight
gradient first). Each variant runs in its own subprocess, so its peak is its own: on CUDA
torch.cuda.max_memory_allocated above the inputs, on CPU the peak RSS (VmHWM, reset once the inputs exist) above
the RSS then, with glibc's mmap threshold pinned at 1 MiB as in memory_bench.py, so that a freed temporary leaves
the process instead of staying resident in the heap (``--glibc-default`` measures without the pin). Prints time
and peak ratios fused/megatron and fused/unfused.

    python benchmarks/output_loss_bench.py                                   # CPU-sized default grid
    python benchmarks/output_loss_bench.py --tokens 4096 16384 --hidden 1536 3584 --reps 3   # the full grid (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("fused", "megatron", "unfused")


def worker(variant: str, dtype_name: str, tokens: int, hidden_size: int, vocab: int, reps: int, objective: str,
           chunk: int, glibc_default: bool = False) -> dict:
    import torch

    if not torch.cuda.is_available() and not glibc_default:
        from memory_bench import pin_mmap_threshold  # beside this script

        pin_mmap_threshold()

    from megatron_sft.parallel import init_model_parallel

    init_model_parallel(tensor_parallel=1)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_sft.fused_output_loss import fused_output_objective_loss
    from megatron_sft.loss import finalize_loss, reduce_loss, vocab_parallel_objective_loss
    from megatron_sft.memory.check import measured_peak_bytes, reset_peak

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(tokens, 1, hidden_size, generator=gen, device=device) * 0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device=device) * 0.02).to(dtype).requires_grad_(True)
    target = torch.randint(0, vocab, (tokens, 1), generator=gen, device=device)
    mask = (torch.rand(tokens, 1, generator=gen, device=device) < 0.7).float()
    weight.main_grad = torch.zeros(vocab, hidden_size, dtype=torch.float32, device=device)  # DDP's buffer
    weight.grad_added_to_main_grad = False

    def ddp_gradient_hook() -> None:
        """megatron-core DDP's post-accumulation hook on the weight (distributed_data_parallel.py)."""
        if weight.grad is not None and not weight.grad_added_to_main_grad:
            weight.main_grad.add_(weight.grad)
        weight.grad, weight.grad_added_to_main_grad = None, False

    def step() -> float:
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if variant == "fused":
            out = fused_output_objective_loss(hidden, weight, target, objective, mask, chunk_tokens=chunk)
            loss = finalize_loss(*reduce_loss(out))
        elif variant == "megatron":
            per_token = vocab_parallel_cross_entropy(torch.matmul(hidden, weight.t()), target)
            loss = (per_token * mask).sum() / mask.sum()
        else:
            out = vocab_parallel_objective_loss(torch.matmul(hidden, weight.t()), target, objective, mask)
            loss = finalize_loss(*reduce_loss(out))
        loss.backward()
        ddp_gradient_hook()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if cuda:
        torch.cuda.synchronize()
    baseline = reset_peak()  # after the inputs exist: building them (fp32 randn, then a cast) peaks higher
    step()  # warm-up
    times = [step() for _ in range(reps)]
    return {"time_s": statistics.median(times), "peak_bytes": measured_peak_bytes(baseline),
            "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} threads)"}


def run_variant(args: argparse.Namespace, variant: str, dtype: str, tokens: int, hidden: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", variant, dtype, str(tokens), str(hidden), "--vocab", str(args.vocab),
           "--reps", str(args.reps), "--objective", args.objective, "--chunk", str(args.chunk)]
    cmd += ["--glibc-default"] if args.glibc_default else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # e.g. out of memory for the unfused logits: reported, the others still run
        print(f"  {variant} failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1536])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up (median reported)")
    parser.add_argument("--objective", default="neg_p", help="objective of fused and unfused (megatron is NLL)")
    parser.add_argument("--chunk", type=int, default=512, help="fused: tokens per chunk (model.loss_chunk_tokens)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="CPU: keep glibc's dynamic mmap threshold (freed heap memory may stay resident)")
    parser.add_argument("--worker", nargs=4, metavar=("VARIANT", "DTYPE", "TOKENS", "HIDDEN"),
                        help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        variant, dtype, tokens, hidden = args.worker[0], args.worker[1], int(args.worker[2]), int(args.worker[3])
        print(json.dumps(worker(variant, dtype, tokens, hidden, args.vocab, args.reps, args.objective, args.chunk,
                                args.glibc_default)))
        return

    print(f"output layer + loss benchmark: vocabulary {args.vocab}, objective {args.objective}, fused chunk "
          f"{args.chunk} tokens, {args.reps} reps, forward + backward")
    print("| tokens | hidden | dtype | fused s | megatron s | unfused s | fused GiB | megatron GiB | unfused GiB | "
          "time fused/megatron | peak fused/megatron | peak fused/unfused |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    device = ""
    for tokens in args.tokens:
        for hidden in args.hidden:
            for dtype in args.dtypes:
                r = {v: run_variant(args, v, dtype, tokens, hidden) for v in VARIANTS}
                device = next((x["device"] for x in r.values() if x), device)

                def cell(v: str, key: str, scale: float = 1.0) -> str:
                    return f"{r[v][key] / scale:.3f}" if r[v] else "failed"

                def ratio(a: str, b: str, key: str) -> str:
                    return f"{r[a][key] / r[b][key]:.2f}" if r[a] and r[b] and r[b][key] > 0 else "-"

                print(f"| {tokens} | {hidden} | {dtype} | {cell('fused', 'time_s')} | {cell('megatron', 'time_s')} | "
                      f"{cell('unfused', 'time_s')} | {cell('fused', 'peak_bytes', 2**30)} | "
                      f"{cell('megatron', 'peak_bytes', 2**30)} | {cell('unfused', 'peak_bytes', 2**30)} | "
                      f"{ratio('fused', 'megatron', 'time_s')} | {ratio('fused', 'megatron', 'peak_bytes')} | "
                      f"{ratio('fused', 'unfused', 'peak_bytes')} |", flush=True)
    print(f"device: {device}")


if __name__ == "__main__":
    main()
