"""On CUDA: a converted checkpoint loads into the Transformer Engine spec (when installed) with HF-equal logits."""

from __future__ import annotations

import pytest
import torch

from megatron_sft.launch import run_local_workers
from megatron_sft.testing.convert_check import convert_and_export_worker, first_result, logits_worker
from megatron_sft.toy.tiny_models import save_tiny_hf_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("variant", ["qwen2-tied-gqa", "llama-untied-mha-rope-scaled"])
def test_converted_checkpoint_on_gpu_matches_hf(tmp_path, variant):
    hf_model = save_tiny_hf_model(tmp_path / "hf", variant)
    input_ids = torch.randint(6, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
    run_local_workers(convert_and_export_worker, 1, str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "export"))
    logits = first_result(run_local_workers(logits_worker, 1, str(tmp_path / "ckpt"), 1, 1, input_ids, None, True))
    # fp32 on the GPU with TF32 off against eager fp32 on CPU: rounding only
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # negative controls, from the HF model itself: the bugs this comparison must catch move logits far more
    with torch.no_grad():
        reversed_positions = torch.arange(input_ids.size(1) - 1, -1, -1).expand_as(input_ids)
        wrong = [hf_model(input_ids, position_ids=reversed_positions).logits]
        q_bias = getattr(hf_model.model.layers[0].self_attn.q_proj, "bias", None)
        if q_bias is not None:
            q_bias.zero_()
            wrong.append(hf_model(input_ids).logits)
    for bad in wrong:
        assert float((bad - expected).abs().max()) > 10 * 1e-4  # measured on CPU: 7.5e-3 .. 1.6e-2
