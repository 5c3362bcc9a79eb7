"""Multi-process conversion checks (module level so spawned workers can import them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def convert_and_export_worker(hf_dir: str, ckpt_dir: str, export_dir: str) -> None:
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.convert.mcore_to_hf import convert_mcore_to_hf

    convert_hf_to_mcore(hf_dir, ckpt_dir, progress=False)
    convert_mcore_to_hf(ckpt_dir, export_dir, progress=False, max_shard_bytes=64 * 1024)  # several shards


def logits_worker(ckpt_dir: str, tensor_parallel: int, pipeline_parallel: int, input_ids: torch.Tensor,
                  save_to: Optional[str] = None) -> Optional[torch.Tensor]:
    """Load ``ckpt_dir`` at TP x PP, return full logits from the last stage's first TP rank (None elsewhere).

    With ``save_to``, also save the model from this layout (a checkpoint written at TP x PP).
    """
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
