"""Training configuration: typed dataclasses, read from YAML, overridden with ``section.key=value`` pairs.

Every field has a default equal to the paper's recipe (AdamW lr 5e-5, betas (0.9, 0.95), weight decay
0.01, 10% warmup then cosine, clip 1.0, global batch 256 sequences, 3 epochs) so a config file only
states what differs. Unknown sections/keys and values of the wrong type fail with the offending key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megatron_sft.config_checks import check_numbers


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and what to do."""


@dataclass
class ModelConfig:
    checkpoint: str = ""  # a megatron-sft checkpoint (megatron-sft convert hf-to-mcore)
    recompute: Literal["none", "full", "selective"] = "none"  # activation recomputation
    fused_output_loss: bool = True  # output layer + f(p) loss chunk by chunk: the logits are never whole
    loss_chunk_tokens: int = 512  # tokens per chunk of the fused output loss
    attention_backend: Literal["auto", "te", "flash", "torch", "local"] = "auto"  # core attention's kernels
    swiglu_fusion: Optional[bool] = None  # megatron-core's fused SwiGLU (null: on with CUDA)
    rope_fusion: Optional[bool] = None  # fused rotary embedding (null: on with CUDA and Transformer Engine)
    masked_softmax_fusion: Optional[bool] = None  # local backend's fused softmax (null: on where its kernel exists)
    # mixture-of-experts models only: the router's load-balancing loss weight (null: the HF config's
    # router_aux_loss_coef, 0.001 for Qwen3-30B-A3B; 0: none) and the expert capacity factor (null: drop nothing)
    moe_aux_loss_coeff: Optional[float] = None
    moe_capacity_factor: Optional[float] = None


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: Optional[bool] = None  # null: on when tensor > 1 (resolved by validate); true/false: as set
    distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks (ZeRO-1)
    expert: int = 1  # expert-parallel size: a mixture of experts' experts split over this many TP x DP ranks
    overlap_grad_reduce: bool = True  # reduce each gradient bucket during the backward (megatron-core DDP)
    overlap_param_gather: bool = True  # distributed optimizer: all-gather updated weights during the next forward
    bucket_size: Optional[int] = None  # gradient elements per bucket (null: megatron-core's max(4e7, 1e6 x DP))


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # jsonl / parquet files, or directories of them / HF datasets
    eval: list[str] = field(default_factory=list)  # optional held-out rows: loss and mean p are logged
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    template: Literal["chat", "plain"] = "chat"
    plain_template: str = "{prompt}\n"
    max_length: int = 2048
    truncation: Literal["truncate", "drop", "error"] = "truncate"
    on_bad_row: Literal["error", "skip"] = "error"
    max_dropped_fraction: float = 0.05  # dropped (truncation=drop) + skipped rows above this fraction: refuse to train
    add_eos: bool = True
    packing: bool = True
    seed: int = 1234


@dataclass
class ObjectiveConfig:
    name: str = "nll"  # any spec from `megatron-sft objectives`
    reduction: Literal["token_mean", "sequence_mean"] = "token_mean"
    denominator: Literal["selected", "valid"] = "selected"
    # global: divide by the tokens of the whole global batch (megatron-core's per-token loss);
    # micro_batch: per micro-batch mean, averaged over micro-batches and DP ranks;
    # micro_batch_sum: per micro-batch means summed over a rank's micro-batches for the gradient, averaged over
    # DP, the logged loss their mean (what the reference trainer does)
    normalization: Literal["global", "micro_batch", "micro_batch_sum"] = "global"
    adaptive_ema: float = 0.9  # adaptive_* objectives: running mean p = ema * previous + (1 - ema) * this step's


DEFAULT_EPOCHS = 3  # passes over the data when neither train.epochs nor train.max_steps is set


@dataclass
class TrainConfig:
    global_batch_size: int = 256  # sequences (packed rows when data.packing) per optimizer step
    micro_batch_size: int = 1
    epochs: Optional[int] = None  # null: DEFAULT_EPOCHS, or exactly max_steps steps when max_steps is set
    max_steps: Optional[int] = None  # alone: the run's and the LR schedule's length; with epochs: stop early
    seed: int = 1234
    on_nonfinite: Literal["skip", "halt"] = "halt"  # a step whose loss or grad norm is NaN/inf
    eval_every_steps: int = 0


@dataclass
class OptimConfig:
    lr: float = 5e-5
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: Optional[int] = None  # overrides warmup_ratio


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end (and on SIGTERM/SIGUSR1)
    keep_last: int = 2
    save_optimizer: bool = True  # needed to resume; a model-only checkpoint is enough to export
    export_hf: bool = True  # write OUTPUT/hf (safetensors) at the end
    verify: Literal["checksum", "size", "none"] = "checksum"  # check a checkpoint against its manifest before resuming


@dataclass
class LogConfig:
    every_steps: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron-sft"
    wandb_run_name: Optional[str] = None
    progress_bar: bool = True


@dataclass
class Config:
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        data = self.to_dict()
        data["optim"]["betas"] = list(data["optim"]["betas"])
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked/converted to the field's type; strings from the command line are parsed as YAML."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value] if origin is list else yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return [_coerce(v, args[0], key) for v in value]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
                value = float(value) if annotation is float and isinstance(value, str) else value
            except (yaml.YAMLError, ValueError):
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if annotation is int and float(value) != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return annotation(value)
    if annotation is str:
        return str(value)
    return value


def _set(section_obj: Any, section: str, key: str, value: Any) -> None:
    hints = typing.get_type_hints(type(section_obj))
    if key not in hints:
        names = ", ".join(f.name for f in dataclasses.fields(section_obj))
        raise ConfigError(f"unknown key {section}.{key}; {section} has: {names}")
    setattr(section_obj, key, _coerce(value, hints[key], f"{section}.{key}"))


def _apply(config: Config, data: dict[str, Any], origin: str) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{origin}: unknown section {section!r}; sections are: {', '.join(sorted(sections))}")
        if section == "output_dir":
            config.output_dir = str(values)
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of key: value")
        for key, value in values.items():
            _set(getattr(config, section), section, key, value)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-5", "data.train=a.jsonl"]`` -> nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.key=value (e.g. optim.lr=1e-5)")
        path, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        if path == "output_dir":
            nested["output_dir"] = raw
            continue
        if path.count(".") != 1:
            raise ConfigError(f"override {pair!r}: the key must be section.key (e.g. optim.lr), got {path!r}")
        section, key = path.split(".")
        nested.setdefault(section, {})[key] = raw if isinstance(value, (dict,)) else value
    return nested


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _apply(config, data, str(path))
    _apply(config, parse_overrides(overrides or []), "command line")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that need no process group; the parallel layout is checked against the world size at start."""
    from megatron_sft.objectives import parse_objective

    if not config.output_dir:
        raise ConfigError("output_dir is not set: add `output_dir: runs/NAME` to the config or output_dir=... on the command line")
    if not config.model.checkpoint:
        raise ConfigError("model.checkpoint is not set: point it at a directory from `megatron-sft convert hf-to-mcore`")
    if not config.data.train:
        raise ConfigError("data.train is empty: list the training files (jsonl / parquet / HF dataset directories)")
    parse_objective(config.objective.name)
    check_numbers(config)
    if config.parallel.sequence_parallel is None:  # not set by the user: on with TP, as Megatron-LM users expect
        config.parallel.sequence_parallel = config.parallel.tensor > 1
    t, o = config.train, config.optim
    positive = {"train.global_batch_size": t.global_batch_size, "train.micro_batch_size": t.micro_batch_size,
                "train.epochs": 1 if t.epochs is None else t.epochs, "data.max_length": config.data.max_length,
                "parallel.tensor": config.parallel.tensor, "parallel.pipeline": config.parallel.pipeline,
                "parallel.expert": config.parallel.expert,
                "log.every_steps": config.log.every_steps, "checkpoint.keep_last": config.checkpoint.keep_last}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not a multiple of train.micro_batch_size {t.micro_batch_size}")
    if not 0 <= o.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr (got lr={o.lr}, min_lr={o.min_lr})")
    vp = config.parallel.virtual_pipeline
    if vp is not None and (vp < 2 or config.parallel.pipeline < 2):
        raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline >= 2 and a value >= 2 (or null)")
    if not 0.0 <= config.objective.adaptive_ema < 1.0:
        raise ConfigError(f"objective.adaptive_ema must be in [0, 1), got {config.objective.adaptive_ema}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1 or null, got {t.max_steps}")


FIELD_HELP = {
    "output_dir": "(required) run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, hf/",
    "model.checkpoint": "(required) megatron-sft checkpoint to start from (`convert hf-to-mcore`, or a training checkpoint)",
    "model.recompute": "activation recomputation: none | selective (attention core) | full (whole layers)",
    "model.fused_output_loss": "compute the output layer and the f(p) loss together, chunk by chunk, so the "
    "[tokens, vocab/TP] logits are never held (any objective, TP, SP; equal to the unfused path within fp32 "
    "rounding); false: megatron-core's output layer, then the loss on its logits",
    "model.loss_chunk_tokens": "tokens per chunk of the fused output loss: peak extra memory is about "
    "chunk x vocab/TP x 6 bytes (bf16); smaller saves memory, larger has fewer TP all-reduces",
    "model.attention_backend": "core attention: auto (te when Transformer Engine and CUDA are present, else flash "
    "with flash-attn and CUDA, else torch) | te | flash (flash-attn) | torch (torch's SDPA; varlen_attn for packed "
    "rows on CUDA) | local (megatron-core's unfused DotProductAttention)",
    "model.swiglu_fusion": "megatron-core's fused SwiGLU (a torch.jit kernel, no Transformer Engine needed): faster, "
    "and it keeps only its input for the backward (3 instead of 5 values of the FFN width per token); null: on "
    "with CUDA; true without CUDA: an error",
    "model.rope_fusion": "fused rotary position embedding (Transformer Engine's kernel); null: on with CUDA and "
    "Transformer Engine; true without them: an error",
    "model.masked_softmax_fusion": "fused scale + mask + softmax of the local attention backend (Apex's / "
    "megatron's CUDA kernels); null: on where they exist; the torch, flash and te backends never use it",
    "model.moe_aux_loss_coeff": "mixture of experts: weight of the router's load-balancing loss (megatron-core's "
    "aux_loss, per micro-batch; logged apart from the objective as moe_aux_loss); null: the HF config's "
    "router_aux_loss_coef (what the model was pre-trained with); 0: off (what HF's forward does unless "
    "output_router_logits)",
    "model.moe_capacity_factor": "mixture of experts: tokens per expert capped at factor x its even share, the "
    "rest dropped (null: none dropped, exactly the HF model)",
    "parallel.tensor": "tensor-parallel size (divides attention heads and KV heads)",
    "parallel.pipeline": "pipeline-parallel size (divides the layers)",
    "parallel.virtual_pipeline": "model chunks per pipeline rank for interleaved 1F1B (null: off)",
    "parallel.sequence_parallel": "split norms/dropout activations over the sequence across TP ranks (null: on "
    "whenever parallel.tensor > 1; set false to turn it off)",
    "parallel.distributed_optimizer": "shard Adam state over data-parallel ranks (ZeRO-1, megatron-core's "
    "distributed optimizer). Used only with more than one data-parallel replica: with one there is nothing to "
    "shard and megatron-core's plain optimizer keeps the same state without the buffer copies. The two save "
    "their state differently, so a resumed run keeps the optimizer its checkpoint was written with",
    "parallel.expert": "expert-parallel size for mixture-of-experts models: divides the experts; the world size must "
    "be a multiple of expert x tensor x pipeline (1 for dense models)",
    "parallel.overlap_grad_reduce": "reduce (or, with the distributed optimizer, reduce-scatter) each gradient "
    "bucket over data-parallel ranks as soon as its backward is done, overlapping the communication with the "
    "rest of the backward (megatron-core DDP); false: one reduction after the last micro-batch's backward. "
    "Same gradients either way; off with one data-parallel replica (nothing to reduce)",
    "parallel.overlap_param_gather": "with parallel.distributed_optimizer: all-gather the updated weights bucket "
    "by bucket during the next forward instead of right after the optimizer step (megatron-core's forward "
    "pre-hooks); weights are gathered in full before every checkpoint. Same weights either way",
    "parallel.bucket_size": "gradient elements per communication bucket with parallel.overlap_grad_reduce (null: "
    "megatron-core's default, max(40M, 1M x data-parallel size)); smaller buckets start communicating earlier",
    "data.train": "training files: .jsonl / .parquet, directories of them, or saved HF datasets",
    "data.eval": "held-out files; loss and mean p logged every train.eval_every_steps",
    "data.prompt_key": "prompt column (dotted path into nested fields, e.g. extra_info.question)",
    "data.response_key": "response column (e.g. extra_info.answer)",
    "data.messages_key": "chat column: a list of {role, content}; every assistant turn is trained on",
    "data.template": "chat: the tokenizer's chat template | plain: data.plain_template",
    "data.plain_template": "prompt format for template=plain, with {prompt}",
    "data.max_length": "tokens per sequence (and per packed row)",
    "data.truncation": "rows over max_length: truncate | drop (skip, counted) | error",
    "data.on_bad_row": "a malformed row: error (names FILE:ROW) | skip (counted in the log)",
    "data.max_dropped_fraction": "refuse to train when more than this fraction of rows is dropped or skipped",
    "data.add_eos": "append the tokenizer's eos token to every response",
    "data.packing": "pack several sequences per row (attention stays within each sequence)",
    "data.seed": "seed of the data order (epoch e uses seed + e)",
    "objective.name": "f(p) spec: nll, neg_p (= p), family:<a>, <base>_above:<q>, <base>_top:<k>, ... (megatron-sft objectives)",
    "objective.reduction": "token_mean over the global batch | sequence_mean (each sequence's mean, averaged)",
    "objective.denominator": "selected: count only tokens a threshold/percentile keeps | valid: all response tokens",
    "objective.normalization": "global: the global batch's token mean (independent of the micro-batch split) | "
    "micro_batch: the mean of per-micro-batch means | micro_batch_sum: the gradient of their sum on each rank, "
    "logged as their mean (what the reference trainer does; clipping then acts on n_micro x the gradient)",
    "objective.adaptive_ema": "adaptive_alpha / adaptive_mix: weight of the previous running mean p in its moving average",
    "train.global_batch_size": "rows per optimizer step (packed rows when data.packing)",
    "train.micro_batch_size": "rows per forward/backward on one rank; the rest is gradient accumulation",
    "train.epochs": "passes over the data; the LR schedule spans them all (null: 3, unless train.max_steps is set)",
    "train.max_steps": "the run's length in steps; alone it also sets the LR schedule's length (warmup and decay fit "
    "inside it, the data repeats as needed), as HF Trainer's max_steps does; with train.epochs set, the schedule "
    "spans the epochs and max_steps only stops early (null: run all epochs)",
    "train.seed": "model-parallel RNG seed",
    "train.on_nonfinite": "a NaN/inf loss or gradient: halt (with a message) | skip the step",
    "train.eval_every_steps": "evaluate data.eval every N steps (0: never)",
    "optim.lr": "peak learning rate (AdamW)",
    "optim.min_lr": "learning rate at the end of the decay",
    "optim.betas": "Adam betas",
    "optim.eps": "Adam epsilon",
    "optim.weight_decay": "decoupled weight decay",
    "optim.clip_grad": "clip the global gradient norm to this (0: off)",
    "optim.schedule": "decay after warmup: cosine | linear | constant",
    "optim.warmup_ratio": "fraction of all steps spent warming up linearly from 0",
    "optim.warmup_steps": "warmup steps (overrides warmup_ratio)",
    "checkpoint.every_steps": "save every N steps (0: only at the end and on SIGTERM/SIGUSR1)",
    "checkpoint.keep_last": "checkpoints kept; older ones are deleted",
    "checkpoint.save_optimizer": "include the optimizer state (needed for --resume)",
    "checkpoint.export_hf": "write OUTPUT/hf (safetensors) from the final checkpoint",
    "checkpoint.verify": "before resuming, check files against the manifest: checksum (sizes + CRC-32) | size | none",
    "log.every_steps": "print the step line every N steps",
    "log.tensorboard": "write OUTPUT/tensorboard",
    "log.wandb": "log to Weights & Biases (pip install 'megatron-sft[wandb]')",
    "log.wandb_project": "W&B project",
    "log.wandb_run_name": "W&B run name",
    "log.progress_bar": "tqdm progress bar on rank 0",
}


def describe_fields() -> str:
    """Every key with its default and meaning, for ``megatron-sft train --help``."""
    lines = [f"  output_dir  {FIELD_HELP['output_dir']}"]
    defaults = Config()
    for section in dataclasses.fields(Config):
        if section.name == "output_dir":
            continue
        for f in dataclasses.fields(getattr(defaults, section.name)):
            key = f"{section.name}.{f.name}"
            value = getattr(getattr(defaults, section.name), f.name)
            lines.append(f"  {key} = {value!r}\n      {FIELD_HELP[key]}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any]) -> Config:
    """The inverse of :meth:`Config.to_dict` (used to hand a config to spawned workers)."""
    config = Config()
    _apply(config, data, "config")
    validate(config)
    return config


def check_checkpoint_exists(config: Config) -> None:
    """model.checkpoint must be a megatron-sft checkpoint (checked at start, not by :func:`validate`, so that
    configs can be written and inspected before the checkpoint exists)."""
    path = Path(config.model.checkpoint)
    if not (path / "model_args.json").is_file():
        raise ConfigError(f"model.checkpoint {path} is not a megatron-sft checkpoint (no model_args.json); convert the "
                          "base model with `megatron-sft convert hf-to-mcore --hf HF_DIR --out CKPT`")


def resolved_value(config, key: str) -> str:
    """One config value as text (``all``: the whole config as YAML), for shell scripts."""
    import json

    value = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, for YAML
    if key != "all":
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(f"--print {key}: no such config key (see `megatron-sft train --help`)")
            value = value[part]
    if isinstance(value, (dict, list, tuple)):
        return yaml.safe_dump(value, sort_keys=False).rstrip()
    return "null" if value is None else str(value)


def config_and_overrides(config: Optional[str], overrides: list[str]) -> tuple[Optional[str], list[str]]:
    """The optional CONFIG positional and the overrides: a first positional ``key=value`` that is not a YAML
    file is an override (everything given on the command line, no config file)."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, list(overrides)
