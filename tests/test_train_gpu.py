"""The trainer's GPU path: Transformer Engine spec, bf16, THD packed attention. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_sft.launch import run_local_workers
from megatron_sft.testing.train_check import make_tiny_run_inputs, per_token_loss_worker, tiny_config, train_worker

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_gpu")
    ckpt, data = make_tiny_run_inputs(root)
    return root, ckpt, data


def _losses(tiny, name: str, *overrides: str) -> list[float]:
    root, ckpt, data = tiny
    config = tiny_config(ckpt, data, root / name, "train.max_steps=6", "optim.lr=3e-3", "objective.name=nll", *overrides)
    return run_local_workers(train_worker, 1, config.to_dict(), False, timeout_s=900)[0]["losses"]


def test_bf16_training_reduces_loss(tiny):
    losses = _losses(tiny, "bf16")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs transformer-engine")
def test_packed_thd_attention_matches_unpacked(tiny):
    """With TE, packed rows run as THD with cu_seqlens: every example's per-token loss equals its unpacked
    forward's (bf16 tolerance)."""
    _, ckpt, data = tiny
    packed = run_local_workers(per_token_loss_worker, 1, str(ckpt), str(data), True, 1, 48, True)[0]
    unpacked = run_local_workers(per_token_loss_worker, 1, str(ckpt), str(data), False, 1, 48, True)[0]
    assert packed.keys() == unpacked.keys()
    for where in packed:
        assert torch.equal(packed[where]["trained"], unpacked[where]["trained"])
        torch.testing.assert_close(packed[where]["loss"], unpacked[where]["loss"], rtol=3e-2, atol=3e-2)
