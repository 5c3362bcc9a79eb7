"""Checks the launcher runs before any worker starts, so that everyday mistakes cost seconds and read as
one line naming the key or file and the fix (they used to surface from every worker, as tracebacks)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_sft.data.source_checks import check_data_source
from megatron_sft.model.args import ModelArgs
from megatron_sft.train.config import Config, ConfigError, check_checkpoint_exists


def _model_args(checkpoint: str) -> ModelArgs:
    path = Path(checkpoint) / "model_args.json"
    try:
        return ModelArgs.load(path)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); convert the model again with `megatron-sft convert hf-to-mcore`") from None


def check_layout(args: ModelArgs, config: Config, nproc: Optional[int]) -> None:
    """The parallel layout against the model (heads, KV heads, layers, vocabulary) and the process count."""
    par, where = config.parallel, f"the model in {config.model.checkpoint}"
    tp, pp, vp = par.tensor, par.pipeline, par.virtual_pipeline or 1
    for count, what in ((args.num_attention_heads, "attention heads"), (args.num_query_groups, "KV heads")):
        if count % tp:
            raise ConfigError(f"parallel.tensor={tp} does not divide the {count} {what} of {where}; use a "
                              f"parallel.tensor that divides {args.num_attention_heads} and {args.num_query_groups}")
    if (args.padded_vocab_size or args.vocab_size) % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide the vocabulary ({args.padded_vocab_size}) of {where}")
    if args.num_layers % (pp * vp):
        raise ConfigError(f"parallel.pipeline={pp}{f' x parallel.virtual_pipeline={vp}' if vp > 1 else ''} does not "
                          f"divide the {args.num_layers} layers of {where}")
    if nproc is not None and nproc % (tp * pp):
        raise ConfigError(f"--nproc {nproc} is not a multiple of parallel.tensor x parallel.pipeline = {tp * pp}")


def preflight(config: Config, nproc: Optional[int] = None) -> None:
    """Checkpoint present and readable, layout fits the model, every data path exists and holds rows."""
    check_checkpoint_exists(config)
    check_layout(_model_args(config.model.checkpoint), config, nproc)
    for key, paths in (("data.train", config.data.train), ("data.eval", config.data.eval)):
        for path in paths:
            check_data_source(path, key)
