"""Workers for tests/test_architectures.py: every architecture's conversions in one process, and its logits at
several layouts in one process group, so that the per-process start (importing megatron-core) is paid once."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_sft.testing.convert_check import convert_and_export_worker, logits_worker


def convert_all_worker(jobs: list[tuple[str, str, str]]) -> None:
    """HF -> mcore -> HF for each (hf_dir, ckpt_dir, export_dir), several shards each."""
    for hf_dir, ckpt_dir, export_dir in jobs:
        convert_and_export_worker(hf_dir, ckpt_dir, export_dir, None, 16 * 1024**2)


def logits_at_layouts_worker(ckpts: list[str], layouts: list[tuple[int, int]],
                             input_ids: torch.Tensor) -> Optional[dict[tuple[str, int, int], torch.Tensor]]:
    """{(ckpt, TP, PP): full logits} from the ranks that hold them (None on the others); the process group is
    re-initialised per layout."""
    found: dict[tuple[str, int, int], torch.Tensor] = {}
    for tp, pp in layouts:
        for ckpt in ckpts:
            logits = logits_worker(ckpt, tp, pp, input_ids)
            if logits is not None:
                found[(ckpt, tp, pp)] = logits
    return found or None


def merge_results(results: list[Optional[dict]]) -> dict:
    """The per-rank dicts of :func:`logits_at_layouts_worker` as one (the first rank's copy wins)."""
    merged: dict = {}
    for result in results:
        for key, value in (result or {}).items():
            merged.setdefault(key, value)
    return merged
