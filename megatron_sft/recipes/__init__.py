"""The paper's experiments as data: model registry, dataset recipes, parallel layout and sweeps.

``megatron-sft sbatch`` and ``megatron-sft sweep`` turn these into Slurm jobs; ``examples/`` holds the
training configs they produce for each dataset x model.
"""
