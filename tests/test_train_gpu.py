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


def test_first_gpu_step_matches_the_fp32_cpu_step(tiny, tmp_path, monkeypatch):
    """The GPU path's first step (bf16 weights, TE when installed) against the same step on CPU in fp32 (one
    process each, CUDA hidden from the CPU run's worker): the loss within bf16 tolerance of a tiny model and
    the gradient norm within 5%; a doubled gradient (the usual scale bug) is 100% off."""
    from megatron_sft.testing.train_reference import run_first_step

    root, ckpt, data = tiny
    config = tiny_config(ckpt, data, root / "gpu_first_step", "train.max_steps=1", "train.eval_every_steps=0")
    gpu = run_first_step(config, 1, tmp_path / "gpu.pt")
    config.output_dir = str(root / "cpu_first_step")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the spawned worker sees no GPU: the fp32 CPU path
    cpu = run_first_step(config, 1, tmp_path / "cpu.pt")
    assert abs(gpu["loss"] - cpu["loss"]) <= 2e-2 * abs(cpu["loss"]), (gpu["loss"], cpu["loss"])
    norm = lambda grads: sum(float(g.double().pow(2).sum()) for g in grads.values()) ** 0.5  # noqa: E731
    assert abs(norm(gpu["grads"]) - norm(cpu["grads"])) <= 0.05 * norm(cpu["grads"])


def test_fusions_change_the_first_step_only_by_rounding(tiny, tmp_path):
    """model.*_fusion at their defaults (SwiGLU fused on any CUDA machine, RoPE with TE) against all off: the
    same first step within bf16 rounding, in loss and gradient norm."""
    from megatron_sft.testing.train_reference import run_first_step

    root, ckpt, data = tiny
    steps = {}
    for name, overrides in {"fused": [], "unfused": ["model.swiglu_fusion=false", "model.rope_fusion=false",
                                                     "model.masked_softmax_fusion=false"]}.items():
        config = tiny_config(ckpt, data, root / f"fusions_{name}", "train.max_steps=1", "train.eval_every_steps=0",
                             *overrides)
        steps[name] = run_first_step(config, 1, tmp_path / f"{name}.pt")
    fused, unfused = steps["fused"], steps["unfused"]
    assert abs(fused["loss"] - unfused["loss"]) <= 1e-2 * abs(unfused["loss"])
    norm = lambda grads: sum(float(g.double().pow(2).sum()) for g in grads.values()) ** 0.5  # noqa: E731
    assert abs(norm(fused["grads"]) - norm(unfused["grads"])) <= 0.02 * norm(unfused["grads"])


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs transformer-engine")
def test_packed_thd_attention_matches_unpacked(tiny):
    """With TE, packed rows run as THD with cu_seqlens: every example's per-token loss equals its unpacked
    forward's (bf16 tolerance)."""
    _, ckpt, data = tiny
    packed = run_local_workers(per_token_loss_worker, 1, str(ckpt), str(data), True, 1, 48, True)[0]
    unpacked = run_local_workers(per_token_loss_worker, 1, str(ckpt), str(data), False, 1, 48, True)[0]
    leaky = run_local_workers(per_token_loss_worker, 1, str(ckpt), str(data), True, 1, 48, True, True)[0]
    assert packed.keys() == unpacked.keys() == leaky.keys()
    error = max(float((packed[w]["loss"] - unpacked[w]["loss"]).abs().max()) for w in packed)
    leak = max(float((leaky[w]["loss"] - unpacked[w]["loss"]).abs().max()) for w in packed)
    for where in packed:
        assert torch.equal(packed[where]["trained"], unpacked[where]["trained"])
    # bf16 rounding of one forward against a leak across sequences (the negative control): the packed path's
    # error must be far below the leak's effect, or the comparison could not tell them apart
    assert error < 0.25 * leak and leak > 1e-2, (error, leak)
