"""Multi-process conversion checks (module level so spawned workers can import them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def convert_and_export_worker(hf_dir: str, ckpt_dir: str, export_dir: str, dtype: Optional[str] = None,
                              max_shard_bytes: int = 64 * 1024) -> None:
    """HF -> mcore -> HF, ``dtype`` given to both conversions (None: the checkpoint's own); several shards."""
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.convert.mcore_to_hf import convert_mcore_to_hf

    convert_hf_to_mcore(hf_dir, ckpt_dir, progress=False, dtype=dtype)
    convert_mcore_to_hf(ckpt_dir, export_dir, progress=False, max_shard_bytes=max_shard_bytes, dtype=dtype)


def safetensors_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``path`` by name."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_tensors(original: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> None:
    """Same names, and per tensor the same dtype, shape and bytes (``torch.equal`` ignores dtype)."""
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        other = exported[name]
        assert (other.dtype, tuple(other.shape)) == (tensor.dtype, tuple(tensor.shape)), (
            name, other.dtype, tuple(other.shape), tensor.dtype, tuple(tensor.shape))
        same = tensor.contiguous().view(torch.uint8).flatten().numpy().tobytes() == \
            other.contiguous().view(torch.uint8).flatten().numpy().tobytes()
        assert same, f"{name}: bytes differ"


def logits_worker(ckpt_dir: str, tensor_parallel: int, pipeline_parallel: int, input_ids: torch.Tensor,
                  save_to: Optional[str] = None, strict_fp32: bool = False) -> Optional[torch.Tensor]:
    """Load ``ckpt_dir`` at TP x PP, return full logits from the last stage's first TP rank (None elsewhere).

    With ``save_to``, also save the model from this layout (a checkpoint written at TP x PP). ``strict_fp32``
    turns TF32 off on CUDA, so GPU logits can be held to fp32 tolerance.
    """
    if strict_fp32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from megatron.core import parallel_state as ps

    from megatron_sft.model.checkpoint import TOKENIZER_DIR, load_model, save_model
    from megatron_sft.model.forward import forward_logits
    from megatron_sft.parallel import init_model_parallel

    init_model_parallel(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
    model, args = load_model(ckpt_dir, params_dtype=torch.float32)
    if torch.cuda.is_available():
        input_ids = input_ids.cuda()
    logits = forward_logits(model, input_ids, vocab_size=args.vocab_size)
    logits = logits.float().cpu() if logits is not None else None
    if save_to is not None:
        save_model(model, args, save_to, tokenizer_src=Path(ckpt_dir) / TOKENIZER_DIR)
    if logits is None or ps.get_tensor_model_parallel_rank() != 0:
        return None
    return logits


def first_result(results: list) -> torch.Tensor:
    found = [r for r in results if r is not None]
    assert len(found) == 1, f"expected logits from exactly one rank, got {len(found)}"
    return found[0]
