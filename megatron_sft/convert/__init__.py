"""HF <-> megatron-core checkpoint conversion."""
