"""What `megatron-sft selftest` runs on an installation: the vocab-parallel loss on local processes against an
independent float64 reference (the tests run the same checks)."""
