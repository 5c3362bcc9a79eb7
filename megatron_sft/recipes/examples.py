"""examples/DATASET/MODEL.yaml: the recipe of every dataset x model pair of the paper, for one 8-GPU node, plus
multi-node layouts of the largest models (``MULTI_NODE``: Qwen2.5-14B on 2 nodes)."""

from __future__ import annotations

from pathlib import Path

from megatron_sft.capability import ALTERNATIVES, region_objective
from megatron_sft.recipes.datasets import RECIPES, DatasetRecipe
from megatron_sft.recipes.models import get_model
from megatron_sft.recipes.parallel_plan import ParallelPlan, plan_parallel
from megatron_sft.recipes.training_config import (
    RECIPE_COMMENTS, config_yaml, recipe_config, recipe_micro_batch, run_name,
)

GPUS_PER_NODE, GPU_MEMORY_GIB = 8, 80.0
# (dataset, model key, nodes): extra examples laid out for several nodes, written as MODEL-Nnodes.yaml
MULTI_NODE = (("instruction_tuning", "qwen2.5-14b", 2),)


def _objective_lines(recipe: DatasetRecipe, path: str) -> tuple[str, str]:
    """(why this objective, a real alternative to compare with): both from the capability rule."""
    if recipe.capability:
        why = (f"the paper places {recipe.name} in the {recipe.capability} region, where the capability rule "
               f"(megatron_sft/capability.py, the one `megatron-sft probe` applies) recommends "
               f"{region_objective(recipe.capability)}")
        return why, ALTERNATIVES[recipe.capability]
    why = (f"the paper's baseline; the paper does not place this dataset on the capability continuum: "
           f"`megatron-sft probe {path}` measures your base model's mean p and applies the capability rule")
    return why, "neg_p"


def _launch_lines(path: str, nodes: int) -> list[str]:
    """How to start training from this file: torchrun on one node, or the Slurm script on several."""
    if nodes == 1:
        return [f"torchrun --nproc_per_node {GPUS_PER_NODE} -m megatron_sft train {path}"]
    return [f"sbatch --nodes={nodes} slurm/train.sbatch {path}      # Slurm: one torchrun per node, c10d rendezvous",
            f"# without Slurm, on each of the {nodes} nodes: torchrun --nnodes {nodes} --nproc_per_node "
            f"{GPUS_PER_NODE} --rdzv-backend c10d --rdzv-endpoint FIRST_NODE:29500 -m megatron_sft train {path}"]


def _header(recipe: DatasetRecipe, key: str, plan: ParallelPlan, path: str, nodes: int) -> str:
    model = get_model(key)
    why, alternative = _objective_lines(recipe, path)
    nodes_text = "one node" if nodes == 1 else f"{nodes} nodes"
    lines = [
        f"{recipe.name} x {key}: {recipe.description}; base model {model.hf_id}.",
        "The reference implementation's recipe for this pair (learning rate, max length, micro-batch, one epoch),",
        f"laid out for {nodes_text} of {GPUS_PER_NODE} x {GPU_MEMORY_GIB:g} GiB GPUs: {plan.reason}.",
        "Full-parameter fine-tuning (every weight is trained; no LoRA/adapters).",
        f"Objective: {recipe.objective} ({why}).",
        "",
        f"  megatron-sft prepare {recipe.name} --out data/{recipe.name}",
        f"  megatron-sft convert hf-to-mcore --hf models/{model.hf_id.split('/')[-1]} --out ckpt/{key}",
        *(f"  {line}" for line in _launch_lines(path, nodes)),
        f"  # compare with {alternative}: append objective.name={alternative} "
        f"output_dir=runs/{run_name(recipe.name, key, alternative)}",
        f"  # on Slurm (convert -> train -> export): megatron-sft sbatch --dataset {recipe.name} --model {key} "
        f"--objective {recipe.objective}" + (f" --nodes {nodes}" if nodes > 1 else ""),
        "",
        "Written by tools/write_examples.py from megatron_sft/recipes; `megatron-sft train --help` lists every key.",
    ]
    return "\n".join(lines)


def example_file(recipe: DatasetRecipe, key: str, nodes: int = 1) -> tuple[str, str]:
    """(relative path, YAML text) of the example for one dataset x model laid out on ``nodes`` nodes."""
    model = get_model(key)
    global_batch, micro = recipe_micro_batch(recipe.name, model.key)
    plan = plan_parallel(model, nodes, GPUS_PER_NODE, GPU_MEMORY_GIB, global_batch, micro)
    config = recipe_config(recipe.name, model.key, recipe.objective, plan)
    relative = f"{recipe.name}/{model.key}.yaml" if nodes == 1 else f"{recipe.name}/{model.key}-{nodes}nodes.yaml"
    header = _header(recipe, model.key, plan, f"examples/{relative}", nodes)
    return relative, config_yaml(config, header, RECIPE_COMMENTS)


def example_files() -> dict[str, str]:
    """Relative path -> YAML text of every example config."""
    files = dict(example_file(recipe, key) for recipe in RECIPES.values() for key in recipe.models)
    files.update(example_file(RECIPES[dataset], key, nodes) for dataset, key, nodes in MULTI_NODE)
    return files


def write_examples(root: Path) -> list[Path]:
    """Write every example and remove the stale YAML files of the datasets' directories (renamed keys)."""
    files = example_files()
    written = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    for dataset in RECIPES:
        for stale in sorted((root / dataset).glob("*.yaml")):
            if f"{dataset}/{stale.name}" not in files:
                stale.unlink()
    return written
