"""Model arguments (from an HF config) and the megatron-core GPTModel built from them."""
