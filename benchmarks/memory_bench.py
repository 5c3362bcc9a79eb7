"""Predicted vs measured peak memory of a training step (megatron_sft/memory/model.py against reality).

Each case runs in fresh processes (one, or two at TP=2 + SP on gloo): megatron-core's local spec in fp32 with
real hidden sizes (1536 = Qwen2.5-1.5B's layer, 3584 = Qwen2.5-7B's), a few layers, the Qwen2.5 vocabulary
(151,936, tied), the fused output loss, megatron-core DDP (fp32 grad buffers), and where the case says so the
distributed optimizer's Adam, over two full steps (the Adam state exists from the first step on). The measured
peak is the process's peak RSS (VmHWM, reset after the imports and process-group set-up) above its RSS at that
moment, i.e. everything the model, data, step and optimizer added; the prediction is memory.model.estimate for
the same layout (cpu_layout). On a GPU the same comparison uses torch.cuda.max_memory_allocated (``--device cuda``).

glibc: by default malloc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so later
tensors below it come from the heap, and what is freed there stays resident (measured: +0.16 GiB at the peak of
the first case, +0.3-0.5 GiB between steps). That is the CPU allocator keeping freed memory, not an
allocation; the workers pin the threshold at 1 MiB (mallopt(M_MMAP_THRESHOLD), which also stops the dynamic
adjustment), so every tensor above 1 MiB is its own mapping, returned on free, and RSS follows the live
tensors as CUDA's allocated-bytes counter does. ``--glibc-default`` measures without it.

    python benchmarks/memory_bench.py --max-gib 9       # every case whose processes fit 9 GiB (~25 min, 2 cores)
    python benchmarks/memory_bench.py                   # every case (the largest needs ~23 GiB)
    python benchmarks/memory_bench.py --quick           # the two smallest cases
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sft.launch import run_local_workers  # noqa: E402
from megatron_sft.memory.check import measured_peak_bytes, reset_peak  # noqa: E402
from megatron_sft.memory.model import GIB, Layout, ModelShape, cpu_layout, estimate  # noqa: E402

VOCAB = 151936
SHAPES = {  # hidden: (heads, kv heads, ffn) of the Qwen2.5 model with that hidden size
    1536: (12, 2, 8960),
    3584: (28, 4, 18944),
}


@dataclass(frozen=True)
class Case:
    hidden: int
    layers: int
    seq: int
    micro_batch: int
    recompute: str
    tensor: int
    optimizer: bool

    def shape(self) -> ModelShape:
        heads, kv, ffn = SHAPES[self.hidden]
        return ModelShape(self.layers, self.hidden, ffn, heads, kv, VOCAB, tied_embeddings=True)

    def layout(self) -> Layout:
        """fp32, local spec (materialised scores, torch norms, torch Adam) on either device: what _model builds."""
        return cpu_layout(tensor=self.tensor, sequence_parallel=self.tensor > 1, seq=self.seq, micro_batch=self.micro_batch,
                          recompute=self.recompute, with_optimizer=self.optimizer)


CASES = [  # the first seven fit 9 GiB of processes together (predicted peak + PROCESS_GIB, times the processes)
    Case(1536, 2, 2048, 1, "none", 1, True),
    Case(1536, 2, 2048, 1, "full", 1, True),
    Case(1536, 2, 2048, 4, "full", 1, False),
    Case(1536, 2, 2048, 1, "none", 2, True),
    Case(1536, 2, 2048, 2, "full", 2, True),
    Case(1536, 2, 2048, 2, "none", 2, False),
    Case(1536, 2, 2048, 4, "full", 2, False),
    Case(1536, 2, 2048, 4, "none", 1, True),
    Case(1536, 2, 2048, 4, "full", 1, True),
    Case(1536, 2, 2048, 2, "none", 2, True),
    Case(1536, 2, 2048, 4, "full", 2, True),
    Case(3584, 2, 2048, 1, "none", 1, False),
    Case(3584, 2, 2048, 2, "full", 1, False),
    Case(3584, 2, 2048, 2, "none", 2, False),
]
QUICK = CASES[:2]
PROCESS_GIB = 0.5  # a worker's RSS before the model (imports, process group): 0.3 GiB measured, with slack
MMAP_THRESHOLD = 1 << 20


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc's mallopt(M_MMAP_THRESHOLD, threshold): blocks above it are mapped and unmapped on free (see the
    module doc). False where there is no glibc."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _model(case: Case, device: str):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_sft.fused_output_loss import install_fused_output_layer
    from megatron_sft.model.args import ModelArgs
    from megatron_sft.model.builder import build_gpt_model, build_transformer_config

    heads, kv, ffn = SHAPES[case.hidden]
    args = ModelArgs(architecture="Qwen2ForCausalLM", vocab_size=VOCAB, hidden_size=case.hidden, ffn_hidden_size=ffn,
                     num_layers=case.layers, num_attention_heads=heads, num_query_groups=kv,
                     kv_channels=case.hidden // heads, max_position_embeddings=32768, norm_eps=1e-6,
                     tie_word_embeddings=True, qkv_bias=True, rope_theta=1e6, padded_vocab_size=VOCAB)
    config = build_transformer_config(args, tensor_parallel=case.tensor, sequence_parallel=case.tensor > 1,
                                      params_dtype=torch.float32,
                                      recompute_granularity=None if case.recompute == "none" else case.recompute)
    model = build_gpt_model(args, config, use_transformer_engine=False).to(device)
    install_fused_output_layer(model)
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True, check_for_nan_in_grad=False))
    optimizer = None
    if case.optimizer:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=False, params_dtype=torch.float32,
                                                           use_distributed_optimizer=True, clip_grad=1.0), [ddp])
    return ddp, optimizer


def _step(ddp, optimizer, case: Case, device: str) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sft.fused_output_loss import fused_output_objective_loss, fused_output_weight

    b, s = case.micro_batch, case.seq
    tokens = torch.randint(0, VOCAB, (b, s + 1), device=device)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), 1).expand(b, 1, s, s).contiguous()
    position_ids = torch.arange(s, device=device).expand(b, s)

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        hidden = chunk(tokens[:, :-1].contiguous(), position_ids, mask)

        def loss_func(output):
            weight, tied_here = fused_output_weight(chunk)
            out = fused_output_objective_loss(output, weight, tokens[:, 1:], "nll", vocab_size=VOCAB, chunk_tokens=512,
                                              weight_gets_other_gradient=tied_here)
            loss = out.per_token_loss.sum() / out.per_token_loss.numel()
            return loss, {"loss": loss.detach()}

        return hidden, loss_func

    ddp.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([0]), model=[ddp], num_microbatches=1,
                                seq_length=s, micro_batch_size=b, forward_only=False)
    if optimizer is not None:
        optimizer.step()


def measure_worker(case_dict: dict, device: str, steps: int, glibc_default: bool = False) -> dict:
    """In a fresh process: the peak added by building the model and running ``steps`` steps of ``case``."""
    from megatron_sft.parallel import init_model_parallel

    if device == "cpu" and not glibc_default:
        pin_mmap_threshold()
    case = Case(**case_dict)
    init_model_parallel(case.tensor, 1)
    torch.manual_seed(0)
    gc.collect()
    baseline = reset_peak()
    start = time.perf_counter()
    ddp, optimizer = _model(case, device)
    for _ in range(steps):
        _step(ddp, optimizer, case, device)
    return {"measured": measured_peak_bytes(baseline), "seconds": time.perf_counter() - start}


def run_case(case: Case, device: str, steps: int, glibc_default: bool = False) -> dict:
    results = run_local_workers(measure_worker, case.tensor, asdict(case), device, steps, glibc_default, timeout_s=1800)
    measured = max(r["measured"] for r in results)
    predicted = estimate(case.shape(), case.layout())
    return {"case": case, "measured": measured, "predicted": predicted.peak, "phase": predicted.peak_phase,
            "seconds": max(r["seconds"] for r in results)}


def _row(result: dict) -> str:
    c: Case = result["case"]
    error = result["predicted"] / result["measured"] - 1
    what = "fwd+bwd+Adam x2" if c.optimizer else "fwd+bwd x2"
    return (f"| {c.hidden} | {c.layers} | {c.micro_batch}x{c.seq} | {c.recompute} | "
            f"{'TP2+SP, 2 proc' if c.tensor > 1 else '1 proc'} | {what} | {result['predicted'] / GIB:.2f} | "
            f"{result['measured'] / GIB:.2f} | {error:+.1%} | {result['phase']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the two smallest cases")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=2, help="steps per case (the Adam state exists from the 2nd)")
    parser.add_argument("--cases", default="", help="comma-separated case numbers (0-based) of CASES to run")
    parser.add_argument("--max-gib", type=float, default=0.0,
                        help="skip cases whose processes together are predicted above this (peak + 0.5 GiB each)")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's dynamic mmap threshold (module doc)")
    args = parser.parse_args()
    print("| hidden | layers | tokens (b x s) | recompute | layout | step | predicted GiB | measured GiB | error | peak at |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    chosen = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else QUICK if args.quick else CASES
    for case in chosen:
        need = (estimate(case.shape(), case.layout()).peak / GIB + PROCESS_GIB) * case.tensor
        if args.max_gib and need > args.max_gib:
            print(f"(skipped: {case} needs ~{need:.1f} GiB > --max-gib {args.max_gib:g})", flush=True)
            continue
        result = run_case(case, args.device, args.steps, args.glibc_default)
        worst = max(worst, abs(result["predicted"] / result["measured"] - 1))
        print(_row(result), flush=True)
    print(f"\nlargest error: {worst:.1%} (device {args.device}; peak per process, max over ranks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
