"""A ``megatron-sft train`` config for one dataset x model x objective (what examples/ and the jobs use)."""

from __future__ import annotations

from typing import Any, Optional

import yaml

from megatron_sft.objectives import canonical_spec
from megatron_sft.recipes.datasets import get_recipe
from megatron_sft.recipes.models import get_model
from megatron_sft.recipes.parallel_plan import ParallelPlan

# comments written next to a key in every recipe config (examples/, sbatch jobs): why a value differs from the
# trainer's default. Packing is on by default, but the recipes reproduce the reference's steps.
RECIPE_COMMENTS = {
    "data.packing": "off as in the reference: packed, each row holds several sequences, so the batch and lr would "
    "not be the paper's; true is faster if you re-tune train.global_batch_size",
}


def run_name(dataset: str, model_key: str, objective: str) -> str:
    """``math_qwen2.5-math-1.5b_neg_p`` (the canonical model key, whatever alias was given); ``family:0.5``
    becomes ``family-0.5`` (a safe directory name)."""
    return f"{dataset}_{get_model(model_key).key}_{canonical_spec(objective).replace(':', '-')}"


def recipe_config(dataset: str, model_key: str, objective: str, plan: ParallelPlan, *, data_root: str = "data",
                  checkpoint_root: str = "ckpt", runs_root: str = "runs", export_hf: bool = True) -> dict[str, Any]:
    """The training config as a nested dict (every value a plain YAML type); see :func:`config_yaml`."""
    recipe, model = get_recipe(dataset), get_model(model_key)
    settings = recipe.settings(model.key)
    data: dict[str, Any] = {
        "train": [f"{data_root}/{dataset}/train.jsonl"],
        "eval": [f"{data_root}/{dataset}/val.jsonl"],
        "prompt_key": "prompt", "response_key": "response",
        "template": model.template, "max_length": recipe.max_length, "packing": False,
    }
    if model.template == "plain":
        data["plain_template"] = model.plain_template
    config: dict[str, Any] = {
        "output_dir": f"{runs_root}/{run_name(dataset, model.key, objective)}",
        "model": {"checkpoint": f"{checkpoint_root}/{model.key}", "recompute": "none"},
        "parallel": {"tensor": plan.tensor, "pipeline": plan.pipeline, "sequence_parallel": plan.sequence_parallel,
                     "distributed_optimizer": True, **({"expert": plan.expert} if plan.expert > 1 else {})},
        "data": data,
        "objective": {"name": canonical_spec(objective)},
        "train": {"global_batch_size": settings.global_batch_size or recipe.global_batch_size,
                  "micro_batch_size": plan.micro_batch_size, "epochs": recipe.epochs, "eval_every_steps": 50},
        "optim": {"lr": settings.lr, "weight_decay": recipe.weight_decay, "warmup_ratio": 0.1, "schedule": "cosine"},
        "checkpoint": {"every_steps": 100, "keep_last": 2, "export_hf": export_hf},
        "log": {"tensorboard": True},
    }
    for dotted, value in recipe.extra.items():
        section, key = dotted.split(".", 1)
        config[section][key] = value
    return config


def recipe_micro_batch(dataset: str, model_key: str) -> tuple[int, int]:
    """(global batch, micro-batch) the reference used for this pair; the plan may lower the micro-batch."""
    recipe = get_recipe(dataset)
    settings = recipe.settings(get_model(model_key).key)
    return (settings.global_batch_size or recipe.global_batch_size, settings.micro_batch_size or recipe.micro_batch_size)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (chat formats) as one double-quoted line with \\n escapes."""


_Dumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None))


def config_yaml(config: dict[str, Any], header: str = "", comments: Optional[dict[str, str]] = None) -> str:
    """YAML text with an optional ``#`` comment header and ``# comment`` after the ``section.key`` lines named in
    ``comments`` (e.g. :data:`RECIPE_COMMENTS`), so the reason for a value sits next to it."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) if header else ""
    lines, section = [], ""
    for line in yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=1000).splitlines():
        if line and not line.startswith(" "):
            section = line.split(":", 1)[0]
        elif line.startswith("  ") and not line.startswith("   ") and ":" in line:
            note = (comments or {}).get(f"{section}.{line.strip().split(':', 1)[0]}")
            line = f"{line}  # {note}" if note else line
        lines.append(line)
    return comment + "\n".join(lines) + "\n"
