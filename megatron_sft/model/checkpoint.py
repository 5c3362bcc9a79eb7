"""A megatron-sft checkpoint directory, and building/loading/saving the GPTModel it holds.

Layout (what conversion writes and training reads and writes):

    CKPT/model_args.json   ModelArgs: everything needed to rebuild the model (from the HF config)
    CKPT/model/            megatron-core distributed checkpoint (torch_dist): loads at any TP/PP
    CKPT/tokenizer/        the HF tokenizer files and chat template, copied unchanged

Directories are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sft.model.args import ModelArgs
from megatron_sft.model.builder import build_gpt_model, build_transformer_config
from megatron_sft.parallel import barrier

MODEL_ARGS_FILE = "model_args.json"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def read_model_args(ckpt_dir: str | Path) -> ModelArgs:
    path = Path(ckpt_dir) / MODEL_ARGS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not a megatron-sft checkpoint "
            "(convert an HF model first: megatron-sft convert hf-to-mcore --hf HF_DIR --out CKPT)"
        )
    return ModelArgs.load(path)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


def refuse_existing_output(final: Path, overwrite: bool) -> None:
    """Called before any work is done, so that an existing output fails fast."""
    if final.exists() and not overwrite:
        raise FileExistsError(f"output directory {final} already exists; pass --overwrite to replace it")


def temporary_sibling(final: Path) -> Path:
    """Where ``final`` is written before it is renamed into place."""
    return final.parent / f".{final.name}.tmp"


def fresh_temporary_sibling(final: Path) -> Path:
    """An empty :func:`temporary_sibling` of ``final`` (left-overs of a crashed write are removed)."""
    tmp = temporary_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_directory(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed after."""
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def build_model_for_current_layout(
    args: ModelArgs,
    *,
    sequence_parallel: bool = False,
    params_dtype: Optional[torch.dtype] = None,
    perform_initialization: bool = False,
    cpu_initialization: bool = False,
    attention_backend: str = "auto",
    moe_capacity_factor: Optional[float] = None,
):
    """GPTModel for this rank's place in megatron-core's TP x PP (x EP) layout (parallel state must be set up);
    ``attention_backend`` as ``model.attention_backend`` (probe and conversion checks: auto)."""
    from megatron.core import parallel_state as ps

    config = build_transformer_config(
        args,
        tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        expert_parallel=ps.get_expert_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        perform_initialization=perform_initialization,
        cpu_initialization=cpu_initialization,
        moe_capacity_factor=moe_capacity_factor,
    )
    return build_gpt_model(
        args, config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        attention_backend=attention_backend,
    )


def chunks_sharded_state_dict(modules: list) -> dict:
    """One sharded state dict for all chunks; tensors are keyed globally, so any layout can load it."""
    if len(modules) == 1:
        return modules[0].sharded_state_dict()
    return {f"chunk{i}": module.sharded_state_dict() for i, module in enumerate(modules)}


def load_weights(modules: list, model_dir: str | Path) -> None:
    """Load CKPT/model into this rank's model chunks (any TP/PP/VPP: megatron-core reshards); every tensor
    the chunks hold must be in the checkpoint."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(chunks_sharded_state_dict(modules), str(model_dir))
    per_chunk = [loaded] if len(modules) == 1 else [loaded[f"chunk{i}"] for i in range(len(modules))]
    for module, state in zip(modules, per_chunk):
        result = module.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise RuntimeError(f"{model_dir}: checkpoint has no values for {missing[:5]} ({len(missing)} tensors)")


def load_model(ckpt_dir: str | Path, **build_kwargs):
    """Build the model for the current TP/PP layout and load the checkpoint's weights (resharding as needed)."""
    args = read_model_args(ckpt_dir)
    model = build_model_for_current_layout(args, **build_kwargs)
    load_weights([model], Path(ckpt_dir) / MODEL_DIR)
    return model, args


def load_tokenizer(ckpt_dir: str | Path):
    """The HF tokenizer saved beside the weights (CKPT/tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(ckpt_dir) / TOKENIZER_DIR))


def pad_token_id(tokenizer) -> int:
    """The id that fills rows: the tokenizer's pad token, else its eos (never trained on either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def save_model(model, args: ModelArgs, ckpt_dir: str | Path, tokenizer_src: Optional[str | Path] = None) -> Path:
    """Collective: every rank calls it. Writes CKPT atomically (temp dir, then rename on rank 0)."""
    from megatron.core import dist_checkpointing

    final = Path(ckpt_dir)
    tmp = temporary_sibling(final)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        (fresh_temporary_sibling(final) / MODEL_DIR).mkdir()
    barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / MODEL_DIR))
    barrier()
    if rank == 0:
        args.save(tmp / MODEL_ARGS_FILE)
        if tokenizer_src is not None:
            copy_tokenizer_files(Path(tokenizer_src), tmp / TOKENIZER_DIR)
        replace_directory(tmp, final)
    barrier()
    return final
