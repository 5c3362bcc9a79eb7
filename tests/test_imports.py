"""The package imports, and its CPU paths run, with none of the GPU-only extras installed."""

from __future__ import annotations

import subprocess
import sys

BLOCK_GPU_EXTRAS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'transformer_engine', 'apex', 'flash_attn', 'vllm'}:
            raise ModuleNotFoundError(f'{name} is blocked for this test', name=name)  # what a missing package raises
sys.meta_path.insert(0, Block())
import pkgutil, importlib, megatron_sft
modules = [m.name for m in pkgutil.walk_packages(megatron_sft.__path__, 'megatron_sft.') if m.name != 'megatron_sft.__main__']
for name in modules:
    importlib.import_module(name)
from megatron_sft.model.builder import transformer_engine_available
assert not transformer_engine_available()
assert len(modules) > 15, modules
print('imported', len(modules), 'modules')
"""


def test_every_module_imports_without_gpu_extras():
    result = subprocess.run([sys.executable, "-c", BLOCK_GPU_EXTRAS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported" in result.stdout


def test_cli_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "megatron_sft", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    for command in ("train", "convert", "prepare", "probe", "eval", "compare", "plot", "sbatch", "sweep", "demo",
                    "continuum", "objectives", "selftest"):
        assert command in result.stdout


def test_sbatch_help_lists_every_model_key_and_dataset():
    from megatron_sft.recipes.datasets import RECIPES
    from megatron_sft.recipes.models import MODELS

    result = subprocess.run([sys.executable, "-m", "megatron_sft", "sbatch", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0
    for spec in MODELS:
        assert all(key in result.stdout for key in spec.keys) and spec.hf_id in result.stdout
    for name in RECIPES:
        assert name in result.stdout


def test_train_help_explains_every_config_key():
    """`megatron-sft train --help` lists every key of every config section with its meaning."""
    import dataclasses

    from megatron_sft.config import Config

    result = subprocess.run([sys.executable, "-m", "megatron_sft", "train", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0
    for section in dataclasses.fields(Config):
        if section.name == "output_dir":
            continue
        for key in dataclasses.fields(section.default_factory()):
            assert f"{section.name}.{key.name} = " in result.stdout, f"{section.name}.{key.name} missing from --help"


def test_eval_help_explains_every_setting_and_benchmark():
    from megatron_sft.evaluation.benchmarks import BENCHMARKS
    from megatron_sft.evaluation.runner import config_fields

    result = subprocess.run([sys.executable, "-m", "megatron_sft", "eval", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for field in config_fields():
        assert "--" + field.name.replace("_", "-") in text and " ".join(field.metadata["help"].split()) in text
    for name in BENCHMARKS:
        assert name in text
