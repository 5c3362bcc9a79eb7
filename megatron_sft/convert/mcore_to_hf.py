"""megatron-sft checkpoint -> HF safetensors (sharded, with index), config.json and tokenizer files.

The output loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and with vLLM. Tensors are
written shard by shard (``max_shard_bytes``), vocabulary padding stripped; peak memory is the model
plus at most one shard of copies (only splits of fused tensors are copied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from megatron_sft.convert.hf_config import write_hf_config
from megatron_sft.convert.mapping import expected_hf_shapes, mcore_to_hf
from megatron_sft.model.checkpoint import (
    TOKENIZER_DIR, copy_tokenizer_files, fresh_temporary_sibling, load_model, read_model_args,
    refuse_existing_output, replace_directory,
)


def _write_shard(directory: Path, number: int, shard: dict[str, torch.Tensor], weight_map: dict[str, str]) -> str:
    """Save one shard as model-<number>.safetensors and record where its tensors went."""
    from safetensors.torch import save_file

    name = f"model-{number:05d}.safetensors"
    save_file(shard, str(directory / name), metadata={"format": "pt"})
    weight_map.update({key: name for key in shard})
    return name


def convert_mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 1024**3,
    dtype: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Export ``ckpt_dir`` (any TP/PP it was saved at) to an HF model directory ``out_dir``."""
    from megatron_sft.parallel import init_model_parallel

    ckpt, out = Path(ckpt_dir), Path(out_dir)
    refuse_existing_output(out, overwrite)
    args = read_model_args(ckpt)
    out_dtype = getattr(torch, dtype or args.torch_dtype)
    init_model_parallel(tensor_parallel=1, pipeline_parallel=1)
    model, _ = load_model(ckpt, params_dtype=out_dtype, cpu_initialization=True)
    state = model.state_dict()

    tmp = fresh_temporary_sibling(out)
    files: list[str] = []
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    expected = expected_hf_shapes(args)
    for name, tensor in tqdm(mcore_to_hf(args, state.__getitem__), total=len(expected), desc="mcore -> hf", disable=not progress):
        assert tuple(tensor.shape) == expected[name], (name, tuple(tensor.shape), expected[name])
        if tensor.dtype != out_dtype:  # checkpoints written before norms followed params_dtype hold fp32 norms
            tensor = tensor.to(out_dtype)
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # a split of a fused tensor: safetensors needs its own storage
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            files.append(_write_shard(tmp, len(files) + 1, shard, weight_map))
            shard, shard_bytes = {}, 0
        shard[name] = tensor
        shard_bytes += nbytes
        total += nbytes
    if shard:
        files.append(_write_shard(tmp, len(files) + 1, shard, weight_map))

    # final names model-0000i-of-0000n.safetensors, as transformers writes them
    renamed = {old: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files)}
    for old, new in renamed.items():
        (tmp / old).rename(tmp / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    write_hf_config(args, out_dtype, tmp)
    if (ckpt / TOKENIZER_DIR).is_dir():
        copy_tokenizer_files(ckpt / TOKENIZER_DIR, tmp)
    replace_directory(tmp, out)
    return out
