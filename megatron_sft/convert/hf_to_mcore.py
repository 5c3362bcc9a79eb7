"""HF safetensors checkpoint -> megatron-sft checkpoint (megatron-core torch_dist, loadable at any TP/PP).

Streams one tensor at a time from the memory-mapped safetensors files into a TP=1 GPTModel (built without
random initialisation), checks every shape against the config, and saves with dist_checkpointing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from megatron_sft.convert.mapping import expected_hf_shapes, hf_to_mcore
from megatron_sft.model.args import ModelArgs
from megatron_sft.model.checkpoint import refuse_existing_output, save_model


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as asked; the message names the file/tensor/flag."""


def open_safetensors(hf_dir: Path) -> tuple[Callable[[str], torch.Tensor], dict[str, tuple[int, ...]]]:
    """(get(name) -> tensor, {name: shape}) over model.safetensors or a sharded index (headers only)."""
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (hf_dir / "model.safetensors").is_file():
        with safe_open(hf_dir / "model.safetensors", framework="pt") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    else:
        raise ConversionError(
            f"{hf_dir}: no model.safetensors or model.safetensors.index.json; only safetensors checkpoints are "
            "read (re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    files = {file: hf_dir / file for file in set(weight_map.values())}
    for file, path in files.items():
        if not path.is_file():
            raise ConversionError(f"{hf_dir}: {file} (listed in model.safetensors.index.json) does not exist")

    def get(name: str) -> torch.Tensor:
        # Open the (memory-mapped) file only for this read: a handle kept open keeps every page read so far
        # mapped, which would add the whole checkpoint's size to the converter's resident memory.
        with safe_open(files[weight_map[name]], framework="pt") as f:
            return f.get_tensor(name)

    shapes: dict[str, tuple[int, ...]] = {}
    for file, path in files.items():
        with safe_open(path, framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys() if weight_map.get(name) == file})
    return get, shapes


def check_hf_shapes(hf_dir: Path, args: ModelArgs, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the config implies is present with its shape, and nothing else is (before any load)."""
    expected = expected_hf_shapes(args)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise ConversionError(f"{hf_dir}: tensors missing from the checkpoint: {missing[:5]} ({len(missing)} in all)")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ConversionError(
                f"{hf_dir}: tensor {name!r} has shape {shapes[name]} but config.json implies {shape}; "
                "the checkpoint and its config disagree"
            )
    ignorable = {"lm_head.weight"} if args.tie_word_embeddings else set()
    unexpected = sorted(n for n in set(shapes) - set(expected) - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ConversionError(f"{hf_dir}: tensors the {args.architecture} config does not account for: {unexpected[:5]}")


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    dtype: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Convert ``hf_dir`` into a megatron-sft checkpoint at ``out_dir``; returns ``out_dir``."""
    from transformers import AutoConfig

    from megatron_sft.model.builder import build_gpt_model, build_transformer_config
    from megatron_sft.parallel import init_model_parallel

    hf_dir, out = Path(hf_dir), Path(out_dir)
    refuse_existing_output(out, overwrite)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir}: no config.json; point --hf at a Hugging Face model directory")
    args = ModelArgs.from_hf_config(AutoConfig.from_pretrained(hf_dir, local_files_only=True))
    if dtype:
        args.torch_dtype = dtype
    get, shapes = open_safetensors(hf_dir)
    check_hf_shapes(hf_dir, args, shapes)

    init_model_parallel(tensor_parallel=1, pipeline_parallel=1)
    params_dtype = getattr(torch, args.torch_dtype)
    config = build_transformer_config(
        args, params_dtype=params_dtype, perform_initialization=False, cpu_initialization=True
    )
    model = build_gpt_model(args, config, use_transformer_engine=False)
    state = model.state_dict()
    targets = {k for k in state if not k.endswith("_extra_state")}
    written: set[str] = set()
    for name, tensor in tqdm(hf_to_mcore(args, get), total=len(targets), desc="hf -> mcore", disable=not progress):
        state[name].copy_(tensor)
        written.add(name)
    if written != targets:
        raise ConversionError(f"{hf_dir}: no HF tensor mapped to {sorted(targets - written)[:5]}")

    return save_model(model, args, out, tokenizer_src=hf_dir)
