"""``megatron-sft doctor``: the environment, the GPU tests and the GPU benchmarks in one report (megatron_sft/doctor.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "doctor", help="what this machine runs and how fast: environment, GPU tests, GPU benchmarks",
        description="Report the GPU, torch/CUDA/cuDNN versions, optional packages (Transformer Engine, flash-attn, "
        "Apex, vLLM) and the attention backend `auto` picks; then, from a source checkout on a CUDA machine, run the "
        "`gpu` tests, benchmarks/loss_bench.py and benchmarks/gpu_train_bench.py (megatron-sft vs a transformers "
        "loop on a Qwen2.5-1.5B shape: tokens/s, MFU, peak memory), each with its own time limit (about 8 "
        "minutes in all on one H100). Writes OUT/report.json and OUT/report.md; exit 1 when a step that ran failed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("doctor_report"), help="report directory (default doctor_report)")
    parser.add_argument("--cpu", action="store_true",
                        help="without CUDA, run the tests' and benchmarks' tiny CPU versions (checks the plumbing only)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_sft.doctor import run_doctor

    report = run_doctor(args.out, cpu=args.cpu, skip_tests=args.skip_tests)
    print(f"report: {args.out / 'report.md'}")
    return 1 if any(step["status"] in ("failed", "timeout") for step in report["steps"]) else 0
