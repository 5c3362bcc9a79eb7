"""model.recompute selective / full give the step of recompute none: same losses, same gradients.

megatron-core's checkpointed backward re-runs the forward inside the backward; on CPU that re-run used to
escape the cuda->cpu shims (megatron_sft/cpu_shims.py) and crash ("Torch not compiled with CUDA enabled")
wherever megatron-core builds a tensor on "cuda", e.g. the default causal mask of unpacked rows. Each layout runs megatron-core's own
schedule (no pipelining / 1F1B) over two micro-batches with dropout on (0.1), so the recomputed forward
must also restore the RNG states (CPU generator and the model-parallel tracker) to draw the same masks;
a counter checks that the checkpointed segments really ran.
"""

from __future__ import annotations

import pytest
import torch

from megatron_sft.launch import run_local_workers

MODES = ("none", "selective", "full")
LAYOUTS = {  # name: (processes, tensor, pipeline, sequence_parallel)
    "tp1": (1, 1, 1, False),
    "tp2_sp": (2, 2, 1, True),
    "pp2": (2, 1, 2, False),
}
SEQ, MICRO, MICRO_BATCHES, VOCAB = 32, 2, 2, 256


def _tiny_args():
    from megatron_sft.model.args import ModelArgs

    return ModelArgs(architecture="Qwen2ForCausalLM", vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=160,
                     num_layers=4, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                     max_position_embeddings=128, norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True,
                     rope_theta=10000.0, padded_vocab_size=VOCAB)


def _build(args, mode: str, tp: int, pp: int, sp: bool, dropout: float):
    from megatron.core import parallel_state as ps

    from megatron_sft.model.builder import build_gpt_model, build_transformer_config

    config = build_transformer_config(args, tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp,
                                      recompute_granularity=None if mode == "none" else mode)
    config.hidden_dropout = config.attention_dropout = dropout
    model = build_gpt_model(args, config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device), device


def _step(model, device: torch.device) -> list[float]:
    """One forward/backward over MICRO_BATCHES micro-batches with megatron-core's schedule; per-stage losses."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    generator = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=generator) for _ in range(MICRO_BATCHES)]
    position_ids = torch.arange(SEQ).expand(MICRO, SEQ).to(device)

    def forward_step(data_iterator, module):
        row = next(data_iterator).to(device)
        # no mask: megatron's default causal mask, as the trainer's unpacked rows (data.packing=false); it is
        # built with device="cuda", which crashed inside the recomputed forward before the shim covered it
        output = module(row[:, :-1].contiguous(), position_ids, None, labels=row[:, 1:].contiguous())

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(tokens), model=[model],
                                      num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO,
                                      forward_only=False)
    return [float(o["loss"]) for o in out]


def recompute_worker(tp: int, pp: int, sp: bool, dropout: float) -> dict:
    """Per recompute mode: this rank's losses, its parameters' gradients and the checkpointed segments run."""
    from megatron.core import tensor_parallel as mc_tp
    from megatron.core.tensor_parallel import random as mc_random

    from megatron_sft.parallel import init_model_parallel

    init_model_parallel(tp, pp)
    forward, calls = mc_random.CheckpointFunction.forward, [0]

    def counted(ctx, *args):
        calls[0] += 1
        return forward(ctx, *args)

    mc_random.CheckpointFunction.forward = staticmethod(counted)
    args, reference, results = _tiny_args(), None, {}
    for mode in MODES:
        model, device = _build(args, mode, tp, pp, sp, dropout)
        if reference is None:
            reference = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for param, value in zip(model.parameters(), reference):
                param.copy_(value)
        torch.manual_seed(11)
        mc_tp.model_parallel_cuda_manual_seed(11)  # the same dropout streams for every mode
        calls[0] = 0
        losses = _step(model, device)
        grads = {name: p.grad.detach().float().cpu().clone() for name, p in model.named_parameters() if p.grad is not None}
        results[mode] = {"losses": losses, "grads": grads, "segments": calls[0]}
    return results


def _check(results: list[dict], rtol: float) -> None:
    for rank, per_mode in enumerate(results):
        base = per_mode["none"]
        assert base["segments"] == 0 and base["grads"], rank
        for mode in ("selective", "full"):
            got = per_mode[mode]
            assert got["segments"] > 0, f"rank {rank}: {mode} ran no checkpointed segment"
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(base["losses"]), rtol=rtol, atol=0)
            assert got["grads"].keys() == base["grads"].keys()
            for name, grad in base["grads"].items():
                error = float((got["grads"][name] - grad).norm() / grad.norm().clamp_min(1e-30))
                assert error <= rtol, f"rank {rank} {mode} {name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("layout", ["tp1", "tp2_sp", pytest.param("pp2", marks=pytest.mark.slow)])
def test_recompute_matches_no_recompute_on_cpu(layout):
    nproc, tp, pp, sp = LAYOUTS[layout]
    results = run_local_workers(recompute_worker, nproc, tp, pp, sp, 0.1, timeout_s=300)
    assert any(r["none"]["losses"] for r in results), "no stage reported a loss"
    _check(results, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["tp1"])
def test_recompute_matches_no_recompute_on_gpu(layout):
    """The same on CUDA (bf16 weights, Transformer Engine spec when installed): the tolerance is bf16's."""
    nproc, tp, pp, sp = LAYOUTS[layout]
    results = run_local_workers(recompute_worker, min(nproc, torch.cuda.device_count()), tp, pp, sp, 0.0, timeout_s=600)
    _check(results, rtol=2e-2)
