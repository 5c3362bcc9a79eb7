"""Time and peak memory of the vocab-parallel f(p) loss vs. naive PyTorch and megatron-core's NLL.

Same inputs for all three (TOKENS x VOCAB logits, fp32 and bf16), forward + backward, on this machine:
  ours      megatron_sft.loss.vocab_parallel_objective_loss with objective --objective (default neg_p, i.e. -p)
  naive     log_softmax(logits.float()) -> gather -> f(p) -> autograd (what HF/TRL-style trainers do)
  megatron  megatron.core.tensor_parallel.vocab_parallel_cross_entropy (NLL only)
Each variant runs in its own subprocess so that its peak RSS (ru_maxrss above the RSS with the inputs
allocated) is its own. The logits handed to the loss (one TOKENS x VOCAB buffer in the input dtype, made
by a stand-in output layer that consumes the logit gradient like a real one) are counted in every variant. Prints ratios ours/naive and ours/megatron.

    python benchmarks/loss_bench.py                       # 4096 x 151936 (Qwen2.5 vocabulary), fp32 + bf16
    python benchmarks/loss_bench.py --tokens 1024 --vocab 32000 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("ours", "naive", "megatron")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(variant: str, dtype_name: str, tokens: int, vocab: int, reps: int, objective: str) -> dict:
    import torch

    from megatron_sft.parallel import init_model_parallel

    init_model_parallel(tensor_parallel=1)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_sft.loss import finalize_loss, reduce_loss, vocab_parallel_objective_loss
    from megatron_sft.objectives import parse_objective

    dtype = getattr(torch, dtype_name)
    obj = parse_objective(objective)
    gen = torch.Generator().manual_seed(0)
    base = torch.empty(tokens, 1, vocab, dtype=dtype)
    base.normal_(generator=gen)
    target = torch.randint(0, vocab, (tokens, 1), generator=gen)

    base.requires_grad_(True)

    class OutputLayer(torch.autograd.Function):
        """Stands in for the output projection: makes the logits buffer, consumes their gradient.

        A leaf tensor would make autograd clone the gradient into .grad; the real output layer's
        backward only reads it (grad @ W), so neither variant is charged for a copy it would not make.
        """

        @staticmethod
        def forward(ctx, x):
            return x.detach().clone()

        @staticmethod
        def backward(ctx, grad):
            assert grad.shape == base.shape
            return None

    def step() -> float:
        logits = OutputLayer.apply(base)
        start = time.perf_counter()
        if variant == "ours":
            loss = finalize_loss(*reduce_loss(vocab_parallel_objective_loss(logits, target, obj)))
        elif variant == "megatron":
            loss = vocab_parallel_cross_entropy(logits, target).mean()
        else:
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            loss = obj.value(logp, torch.log(-torch.expm1(logp))).mean()
        loss.backward()
        elapsed = time.perf_counter() - start
        del logits, loss
        return elapsed

    baseline = _rss_bytes()
    step()  # warm-up
    times = [step() for _ in range(reps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"time_s": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (median reported)")
    parser.add_argument("--objective", default="neg_p", help="objective for ours and naive (megatron is always NLL)")
    parser.add_argument("--json", type=Path, help="also write every figure and ratio here")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(*args.worker, args.tokens, args.vocab, args.reps, args.objective)))
        return

    print(f"loss benchmark: {args.tokens} tokens x {args.vocab} vocab, objective {args.objective}, "
          f"{args.reps} reps, {os.cpu_count()} CPU threads")
    print(f"{'dtype':9} {'variant':9} {'fwd+bwd s':>10} {'peak GiB':>9}")
    report = {"tokens": args.tokens, "vocab": args.vocab, "objective": args.objective, "dtypes": {}}
    for dtype in args.dtypes:
        results = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--worker", variant, dtype, "--tokens", str(args.tokens),
                   "--vocab", str(args.vocab), "--reps", str(args.reps), "--objective", args.objective]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[variant] = json.loads(out)
            r = results[variant]
            print(f"{dtype:9} {variant:9} {r['time_s']:10.3f} {r['peak_bytes'] / 2**30:9.2f}")
        ours, naive, mega = results["ours"], results["naive"], results["megatron"]
        print(f"{dtype:9} ratios    time ours/megatron = {ours['time_s'] / mega['time_s']:.3f}   "
              f"time ours/naive = {ours['time_s'] / naive['time_s']:.3f}   "
              f"peak ours/naive = {ours['peak_bytes'] / naive['peak_bytes']:.3f}   "
              f"peak ours/megatron = {ours['peak_bytes'] / mega['peak_bytes']:.3f}")
        report["dtypes"][dtype] = {**results, "time_ours_over_megatron": ours["time_s"] / mega["time_s"],
                                   "peak_ours_over_megatron": ours["peak_bytes"] / mega["peak_bytes"]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
