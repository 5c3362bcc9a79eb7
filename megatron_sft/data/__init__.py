"""SFT data: reading rows (jsonl / parquet / HF datasets), tokenising with response-only loss, packing."""
