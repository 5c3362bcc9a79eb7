"""Benchmark evaluation: test sets, generation backends, graders, metrics and tables (``megatron-sft eval``)."""
