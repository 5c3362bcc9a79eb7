"""examples/DATASET/MODEL.yaml: the recipe of every dataset x model pair of the paper, for one 8-GPU node."""

from __future__ import annotations

from pathlib import Path

from megatron_sft.recipes.datasets import RECIPES
from megatron_sft.recipes.models import get_model
from megatron_sft.recipes.parallel_plan import plan_parallel
from megatron_sft.recipes.training_config import config_yaml, recipe_config, recipe_micro_batch

NODE = dict(nodes=1, gpus_per_node=8, gpu_memory_gib=80.0)


def example_files() -> dict[str, str]:
    """Relative path -> YAML text of every example config."""
    files = {}
    for recipe in RECIPES.values():
        for key in recipe.models:
            model = get_model(key)
            global_batch, micro = recipe_micro_batch(recipe.name, key)
            plan = plan_parallel(model, global_batch_size=global_batch, micro_batch_size=micro, **NODE)
            config = recipe_config(recipe.name, key, recipe.objective, plan)
            repo = model.hf_id.split("/")[-1]
            header = (
                f"{recipe.name} x {key}: {recipe.description}; base model {model.hf_id}.\n"
                f"The reference implementation's recipe for this pair (learning rate, max length, micro-batch, one epoch),\n"
                f"laid out for one node of 8 x 80 GiB GPUs: {plan.reason}.\n"
                f"Objective: {recipe.objective}"
                + (f" (the paper places {recipe.name} at the {recipe.capability} end)" if recipe.capability else "") + ".\n"
                f"\n"
                f"  megatron-sft prepare {recipe.name} --out data/{recipe.name}\n"
                f"  megatron-sft convert hf-to-mcore --hf models/{repo} --out ckpt/{key}\n"
                f"  torchrun --nproc_per_node 8 -m megatron_sft train examples/{recipe.name}/{key}.yaml\n"
                f"  # another objective: ... objective.name=nll output_dir=runs/{recipe.name}_{key}_nll\n"
                f"  # on Slurm (convert -> train -> export): megatron-sft sbatch --dataset {recipe.name} --model {key} "
                f"--objective {recipe.objective}\n"
                f"\n"
                f"Written by tools/write_examples.py from megatron_sft/recipes; `megatron-sft train --help` lists every key."
            )
            files[f"{recipe.name}/{key}.yaml"] = config_yaml(config, header)
    return files


def write_examples(root: Path) -> list[Path]:
    written = []
    for relative, text in example_files().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
