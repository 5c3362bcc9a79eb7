"""Reference implementations and multi-process checks used by the tests and ``megatron-sft selftest``."""
