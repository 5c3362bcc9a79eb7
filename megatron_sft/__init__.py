"""megatron-sft: supervised fine-tuning on megatron-core with probability-based objectives f(p).

Importing the package is cheap and needs none of the GPU extras (transformer-engine, apex, flash-attn, vllm).
"""

__version__ = "0.1.0"
