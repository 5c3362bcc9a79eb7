"""``megatron-sft prepare``: the paper's training sets in the trainer's prompt/response jsonl format."""
