"""``megatron-sft convert``: HF <-> megatron-core checkpoints."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert",
        help="convert HF checkpoints to megatron-core and back to HF safetensors (no target TP/PP: checkpoints "
        "reshard when training loads them)",
        description="hf-to-mcore writes CKPT/{model_args.json, model/ (torch_dist), tokenizer/}. It takes no "
        "parallel layout: the checkpoint is written once and resharded to the run's parallel.tensor / "
        "parallel.pipeline when `megatron-sft train` (or probe) loads it, so one conversion serves every layout. "
        "mcore-to-hf writes sharded safetensors, the index, config.json "
        "and the tokenizer files, loadable by transformers and vLLM. Supported: Qwen2/Qwen2.5 (-Math, -Coder) and "
        "Llama (Llama-3.x, DeepSeek-Math).",
    )
    conv = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    to_mcore = conv.add_parser("hf-to-mcore", help="HF model directory -> megatron-sft checkpoint")
    to_mcore.add_argument("--hf", required=True, help="local HF model directory (config.json + *.safetensors)")
    to_mcore.add_argument("--out", required=True, help="checkpoint directory to write (must not exist unless --overwrite)")
    to_mcore.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="weight dtype (default: the HF config's)")
    to_mcore.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    to_mcore.add_argument("--no-progress", action="store_true", help="no progress bar")
    to_mcore.set_defaults(run=run)

    to_hf = conv.add_parser("mcore-to-hf", help="megatron-sft checkpoint -> HF model directory")
    to_hf.add_argument("--checkpoint", required=True,
                       help="megatron-sft checkpoint directory (from hf-to-mcore or a training step_N), or a training "
                       "run's output_dir / its checkpoints/ directory, which mean the checkpoint `latest` names")
    to_hf.add_argument("--out", required=True, help="HF directory to write (must not exist unless --overwrite)")
    to_hf.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="weight dtype (default: the checkpoint's)")
    to_hf.add_argument("--max-shard-gb", type=float, default=1.0, help="largest safetensors shard in GiB (default 1; peak memory is the model plus about one shard)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    to_hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    to_hf.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_sft.convert.hf_to_mcore import ConversionError, convert_hf_to_mcore
    from megatron_sft.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_sft.model.args import UnsupportedModelError

    try:
        if args.direction == "hf-to-mcore":
            out = convert_hf_to_mcore(args.hf, args.out, overwrite=args.overwrite, dtype=args.dtype, progress=not args.no_progress)
        else:
            out = convert_mcore_to_hf(
                resolve_checkpoint(args.checkpoint), args.out, overwrite=args.overwrite, dtype=args.dtype,
                max_shard_bytes=int(args.max_shard_gb * 1024**3), progress=not args.no_progress,
            )
    except (ConversionError, UnsupportedModelError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"megatron-sft convert: error: {err}")
        return 2
    print(f"wrote {out}")
    return 0


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory as given, or the newest checkpoint of a training run (OUTPUT or OUTPUT/checkpoints)."""
    from pathlib import Path

    from megatron_sft.train.checkpointing import LATEST, latest_checkpoint

    for checkpoints in (Path(path) / "checkpoints", Path(path)):
        if (checkpoints / LATEST).is_file():
            return str(latest_checkpoint(checkpoints))
    return path
