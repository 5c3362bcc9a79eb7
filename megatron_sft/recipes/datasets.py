"""Training recipes per dataset of the paper, with the per-model settings of the reference scripts.

Values follow the reference implementation's training scripts (one epoch, global batch 256 sequences,
max length and micro-batch per dataset, the learning rate per model). The data files are what
``megatron-sft prepare DATASET`` writes (``data/DATASET/{train,val}.jsonl``, prompt/response rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class UnknownRecipeError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSettings:
    lr: float = 5e-5
    global_batch_size: Optional[int] = None  # None: the dataset's
    micro_batch_size: Optional[int] = None


@dataclass(frozen=True)
class DatasetRecipe:
    name: str
    description: str
    max_length: int
    micro_batch_size: int
    models: dict[str, ModelSettings]  # reference model key -> its settings (the paper's pairs)
    weight_decay: float = 0.01
    global_batch_size: int = 256
    epochs: int = 1
    eval_benchmarks: tuple[str, ...] = ()
    capability: str = ""  # where the paper places it on the capability continuum (a region of capability.py)
    extra: dict[str, object] = field(default_factory=dict)  # further section.key values

    @property
    def objective(self) -> str:
        """The capability rule's objective for the paper's region (the probe gives the same advice for a
        measured mean p); NLL, the paper's baseline, where the paper places the dataset nowhere."""
        from megatron_sft.capability import region_objective

        return region_objective(self.capability) if self.capability else "nll"

    def settings(self, model_key: str) -> ModelSettings:
        """The reference's settings for this model (any spelling of its key), or the dataset's defaults for a
        pairing it did not run."""
        from megatron_sft.recipes.models import get_model

        wanted = get_model(model_key).key
        return next((s for key, s in self.models.items() if get_model(key).key == wanted), ModelSettings())


RECIPES: dict[str, DatasetRecipe] = {recipe.name: recipe for recipe in (
    DatasetRecipe(
        "math", "NuminaMath-CoT (chain-of-thought math solutions)", max_length=3072, micro_batch_size=4,
        models={"qwen2.5-math-1.5b": ModelSettings(), "qwen2.5-math-7b": ModelSettings(),
                "llama-3.1-8b": ModelSettings(lr=2e-5), "deepseek-math-7b": ModelSettings()},
        eval_benchmarks=("math500", "minerva", "olympiadbench", "aime24", "amc23"), capability="model-strong",
    ),
    DatasetRecipe(
        "medical", "m23k (medical reasoning, final answers without the thinking trace)", max_length=800,
        micro_batch_size=16,
        models={"qwen2.5-1.5b": ModelSettings(), "qwen2.5-math-7b": ModelSettings(),
                "llama-3.2-3b": ModelSettings(), "llama-3.1-8b": ModelSettings(lr=2e-5)},
        eval_benchmarks=("medqa", "medmcqa", "mmlu_pro_medical", "gpqa_medical", "medbullets_op4",
                         "medbullets_op5", "pubmedqa"),
        capability="model-intermediate",
    ),
    DatasetRecipe(
        "figfont", "reasoning-gym figlet_font (read a word drawn in ASCII-art letters)", max_length=800,
        micro_batch_size=16, weight_decay=1e-5,
        models={"qwen2.5-7b": ModelSettings(), "qwen2.5-1.5b": ModelSettings(),
                "llama-3.1-8b": ModelSettings(lr=2e-5), "llama-3.2-3b": ModelSettings()},
        eval_benchmarks=("figfont",), capability="model-weak",
    ),
    DatasetRecipe(
        "coder", "Magicoder-OSS-Instruct-75K (code instructions and solutions)", max_length=3096, micro_batch_size=4,
        models={"qwen2.5-coder-7b": ModelSettings()}, eval_benchmarks=("humaneval_plus", "mbpp_plus"),
    ),
    DatasetRecipe(
        "instruction_tuning", "Magpie-Pro-300K-Filtered (70k sampled) + WizardLM evol-instruct 70k", max_length=2048,
        micro_batch_size=8, weight_decay=1e-4,
        models={"qwen2.5-3b": ModelSettings(lr=2e-5, global_batch_size=224, micro_batch_size=14),
                "qwen2.5-7b": ModelSettings(lr=5e-6), "qwen2.5-14b": ModelSettings(lr=1e-6)},
        eval_benchmarks=("alpacaeval",),
    ),
    DatasetRecipe(
        "low_resource_language", "MURI-IT (mar, tel, nep, swa, wol, yor, zul instruction pairs)", max_length=1024,
        micro_batch_size=16, weight_decay=1e-4,
        models={"qwen2.5-7b": ModelSettings(), "llama-3.1-8b": ModelSettings()},
        eval_benchmarks=tuple(f"mmlu_prox_{lang}" for lang in ("mar", "tel", "nep", "swa", "wol", "yor", "zul")),
    ),
)}


def get_recipe(name: str) -> DatasetRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownRecipeError(f"unknown dataset {name!r}; known datasets: {', '.join(RECIPES)}") from None
