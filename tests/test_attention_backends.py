"""``model.attention_backend``: the ``torch`` backend (SDPA / varlen) against megatron-core's local
``DotProductAttention`` (the reference: explicit scores, mask and softmax), same weights, logits and every
parameter's gradient; packed and unpacked rows, GQA (tiny Qwen2, tied) and MHA (tiny Llama); TP=1, TP=2+SP,
PP=2; and how ``auto`` / ``te`` / ``flash`` resolve on a machine without them.

Negative control (checked by hand once): ``equivalence_worker(..., drop_packed_mask=True)`` (the torch
backend ignoring the packed block mask) gives a packed logits error of about 0.33 and gradient errors of about
0.8, against 1e-7 here."""

from __future__ import annotations

import pytest
import torch

from megatron_sft.config import ConfigError, FIELD_HELP, load_config
from megatron_sft.launch import run_local_workers
from megatron_sft.model import attention_backends
from megatron_sft.model.attention_backends import packs_as_thd, resolve_attention_backend
from megatron_sft.testing.attention_check import equivalence_worker, packed_vs_unpacked_worker
from megatron_sft.toy.tiny_models import save_tiny_hf_model

TOLERANCE = 1e-5  # relative error of the logits and of each parameter's gradient (fp32)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> list[str]:
    """Tiny Qwen2 (GQA: 4 heads, 2 KV heads, tied embeddings, q/k/v biases) and Llama (MHA, llama3 rope)."""
    root = tmp_path_factory.mktemp("attention_backends")
    dirs = []
    for variant in ("qwen2-tied-gqa", "llama-untied-mha-rope-scaled"):
        save_tiny_hf_model(root / variant, variant, layers=2, hidden=64)
        dirs.append(str(root / variant))
    return dirs


def _assert_equal_to_local(results: list[list[dict]], expected_cases: int) -> None:
    for rank, cases in enumerate(results):
        assert len(cases) == expected_cases, rank
        for case in cases:
            label = (rank, case["model"], f"TP{case['tp']} PP{case['pp']}", "packed" if case["packed"] else "unpacked",
                     "THD" if case["thd"] else "mask")
            assert case["backend_used"] == "torch", label
            assert case["logits"] is None or case["logits"] <= TOLERANCE, (label, case["logits"])
            worst = max(case["grads"].items(), key=lambda item: item[1])
            assert worst[1] <= TOLERANCE, (label, worst)
            assert len(case["grads"]) >= 7, label  # every parameter of the stage compared


def test_torch_backend_equals_local_at_tp1_and_tp2_sp(tiny_models):
    """2 gloo processes: TP=1 (each rank alone), TP=2 + SP with the block mask, and TP=2 + SP with packed rows as
    THD cu_seqlens (what the CUDA varlen kernel gets; on CPU the mask is rebuilt from cu_seqlens)."""
    layouts = [(1, 1, False), (2, 1, False), (2, 1, True)]
    results = run_local_workers(equivalence_worker, 2, tiny_models, layouts, "torch", timeout_s=300)
    _assert_equal_to_local(results, expected_cases=2 * (2 + 2 + 1))


@pytest.mark.slow
def test_torch_backend_equals_local_at_pp2(tiny_models):
    results = run_local_workers(equivalence_worker, 2, tiny_models, [(1, 2, False), (1, 2, True)], "torch", timeout_s=300)
    _assert_equal_to_local(results, expected_cases=2 * (2 + 1))
    assert sum(case["logits"] is not None for case in results[1]) == 6  # the last stage returned logits


def test_auto_falls_back_to_torch_and_te_or_flash_without_them_is_one_line(monkeypatch):
    monkeypatch.setattr(attention_backends, "transformer_engine_available", lambda: False)
    monkeypatch.setattr(attention_backends, "flash_attn_available", lambda: False)
    assert resolve_attention_backend("auto") == "torch"
    assert resolve_attention_backend("local") == "local" and resolve_attention_backend("torch") == "torch"
    for name, install in (("te", "transformer-engine"), ("flash", "flash-attn")):
        with pytest.raises(ConfigError) as err:
            resolve_attention_backend(name)
        message = str(err.value)
        assert "\n" not in message and f"model.attention_backend={name}" in message and install in message
    monkeypatch.setattr(attention_backends, "flash_attn_available", lambda: True)
    assert resolve_attention_backend("auto") == "flash"
    monkeypatch.setattr(attention_backends, "transformer_engine_available", lambda: True)
    assert resolve_attention_backend("auto") == "te"


def test_packed_rows_reach_each_backend_in_its_form():
    """Variable-length kernels take THD cu_seqlens; masked attention the block mask (torch on CPU)."""
    assert packs_as_thd("te") and packs_as_thd("flash") and not packs_as_thd("local")
    assert packs_as_thd("torch") == (torch.cuda.is_available() and attention_backends.varlen_attn_available())


def test_config_key_and_help():
    assert "model.attention_backend" in FIELD_HELP and "varlen_attn" in FIELD_HELP["model.attention_backend"]
    config = load_config(None, ["output_dir=x", "model.checkpoint=c", "data.train=d", "model.attention_backend=torch"])
    assert config.model.attention_backend == "torch"
    assert load_config(None, ["output_dir=x", "model.checkpoint=c", "data.train=d"]).model.attention_backend == "auto"
    with pytest.raises(ConfigError, match="model.attention_backend"):
        load_config(None, ["output_dir=x", "model.checkpoint=c", "data.train=d", "model.attention_backend=fast"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_varlen_and_sdpa_equal_local_in_bf16_and_packed_equals_unpacked(tiny_models):
    """bf16 on one GPU: SDPA (unpacked) and varlen_attn (packed THD) against the local spec, and each packed
    sequence's per-token loss against the same sequence alone, far below a leak across sequences."""
    results = run_local_workers(equivalence_worker, 1, tiny_models, [(1, 1, False), (1, 1, True)], "torch",
                                timeout_s=600)[0]
    for case in results:
        assert case["logits"] <= 2e-2, case["logits"]
        assert max(case["grads"].values()) <= 5e-2, case["grads"]
    for hf_dir in tiny_models:
        found = run_local_workers(packed_vs_unpacked_worker, 1, hf_dir, "torch", timeout_s=600)[0]
        assert found["thd"] == float(attention_backends.varlen_attn_available())
        assert found["error"] < 0.25 * found["leak"] and found["leak"] > 1e-2, found
