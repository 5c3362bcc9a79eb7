"""CPU shims that let megatron-core run on a machine without CUDA (gloo backend).

megatron-core assumes a CUDA device in a handful of places (RNG tracker, buffer placement,
hard-coded ``device="cuda"``). On a CPU-only machine we redirect those to the CPU so that
TP / SP / PP / interleaved PP run unchanged for development and CI. Nothing here is active
when CUDA is available: :func:`apply_cpu_shims` is a no-op then.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_DEVICE_MODE: "_CudaToCpuMode | None" = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _to_cpu_device(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return value


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda`` arguments to cpu, makes ``Tensor.cuda()`` a no-op and ``Tensor.type()`` name
    CPU tensors as ``torch.cuda.*`` (megatron-core's optimizers check parameter types by that name)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers accept parameters only if type() names a torch.cuda.* tensor
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_to_cpu_device(a) for a in args)
        return func(*args, **kwargs)


def apply_cpu_shims() -> bool:
    """Install the shims once per process. Returns True when they are active."""
    global _APPLIED, _DEVICE_MODE
    if cuda_available():
        return False
    if _APPLIED:
        return True

    # 1. RNG: route the CUDA generator calls used by megatron's RNG tracker to the CPU generator.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, which therefore stays a no-op.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)  # type: ignore[assignment]
    from megatron.core.tensor_parallel import random as mc_random

    mc_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state().clone()
    mc_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # 2. Device placement: megatron places buffers on torch.cuda.current_device().
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 0  # type: ignore[assignment]

    # 3. Hard-coded cuda devices and .cuda() calls.
    _DEVICE_MODE = _CudaToCpuMode()
    _DEVICE_MODE.__enter__()

    # 4. Checkpoint writing: megatron-core's torch_dist writer forks one process per write bucket. On CPU
    #    the fork happens after torch's OpenMP threads exist and the child deadlocks; write in-process.
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_write_buckets_in_process)

    # 5. Activation recomputation (model.recompute): see _recompute_under_device_mode.
    _recompute_under_device_mode()

    _APPLIED = True
    return True


def define_missing_transformer_engine_names() -> None:
    """megatron-core's MoE router reads ``te_general_gemm`` whether or not Transformer Engine imported (its
    ``except ImportError`` branch never defines it: NameError on the first routed token); without TE it must be
    None, which selects the plain torch matmul. Needed on any machine without TE, CPU or GPU."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _recompute_under_device_mode() -> None:
    """Run megatron-core's recomputed forwards under the cuda->cpu mode.

    A torch function mode is switched off while its own handler runs, and ``loss.backward()`` /
    ``torch.autograd.backward`` enter through the handler, so the whole backward runs without the rewrite.
    That is harmless for gradients, but recomputation (``CheckpointFunction`` for full and selective,
    ``CheckpointWithoutOutput``) re-runs the forward inside the backward, where megatron's hard-coded
    ``device="cuda"`` (e.g. the default causal mask) then fails with "Torch not compiled with CUDA enabled".
    """
    from megatron.core.tensor_parallel import random as mc_random

    backward = mc_random.CheckpointFunction.backward

    def checkpoint_backward(ctx, *grads):
        with _CudaToCpuMode():
            return backward(ctx, *grads)

    mc_random.CheckpointFunction.backward = staticmethod(checkpoint_backward)
    recompute = mc_random.CheckpointWithoutOutput._recompute

    def recompute_without_output(self, *args):
        with _CudaToCpuMode():
            return recompute(self, *args)

    mc_random.CheckpointWithoutOutput._recompute = recompute_without_output


def _write_buckets_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue) -> None:
    """Drop-in for FileSystemWriterAsync.write_preloaded_data_multiproc without forking."""
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results: dict = {}
    for index, bucket in enumerate(write_buckets):
        local_results: queue.Queue = queue.Queue()
        count: queue.Queue = queue.Queue()
        count.put(index)
        FileSystemWriterAsync.write_preloaded_data(
            transform_list, index, bucket, local_results, count, True, use_msc=use_msc
        )
        _, outcome = local_results.get()
        if isinstance(outcome, Exception):
            global_results_queue.put(outcome)
            return
        results[index] = outcome
    global_results_queue.put(results)


def cpu_transformer_config_overrides() -> dict[str, Any]:
    """TransformerConfig flags that must be set on CPU (fusions need CUDA kernels)."""
    return dict(
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # gloo's batch_isend_irecv does not keep a send to the next stage apart from a send to the previous
        # stage when they are the same rank (interleaved PP=2): activations and gradients got swapped.
        # Separate, ordered isend/irecv calls (megatron-core's _p2p_ops) keep them apart.
        batch_p2p_comm=False,
    )


@functools.cache
def default_backend() -> str:
    return "nccl" if cuda_available() else "gloo"
