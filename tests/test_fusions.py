"""model.swiglu_fusion / rope_fusion / masked_softmax_fusion: null = on wherever the kernel runs, true = on or
a one-line error naming what is missing, false = off (megatron_sft/model/fusions.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_sft.config import ConfigError, ModelConfig
from megatron_sft.model import fusions
from megatron_sft.model.fusions import resolve_fusions


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case")
def test_on_cpu_null_is_off_and_true_is_refused_naming_cuda():
    assert resolve_fusions(ModelConfig(), "torch") == {
        "bias_activation_fusion": False, "apply_rope_fusion": False, "masked_softmax_fusion": False}
    for key in fusions.FUSIONS:
        with pytest.raises(ConfigError, match=f"model.{key}=true needs CUDA"):
            resolve_fusions(ModelConfig(**{key: True}), "torch")


def test_null_turns_on_exactly_what_can_run(monkeypatch):
    """As on a CUDA machine without Transformer Engine and Apex: SwiGLU fusion on (megatron-core's own kernel),
    RoPE off (TE's kernel), masked softmax off (not the local backend; Apex kernels absent)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fusions, "_te_rope_available", lambda: False)
    assert resolve_fusions(ModelConfig(), "torch") == {
        "bias_activation_fusion": True, "apply_rope_fusion": False, "masked_softmax_fusion": False}
    assert resolve_fusions(ModelConfig(swiglu_fusion=False), "torch")["bias_activation_fusion"] is False
    with pytest.raises(ConfigError, match="Transformer Engine"):
        resolve_fusions(ModelConfig(rope_fusion=True), "torch")
    with pytest.raises(ConfigError, match="attention_backend=local"):
        resolve_fusions(ModelConfig(masked_softmax_fusion=True), "torch")
    monkeypatch.setattr(fusions, "_te_rope_available", lambda: True)
    assert resolve_fusions(ModelConfig(), "te")["apply_rope_fusion"] is True


def test_a_refused_fusion_is_one_line_before_any_worker(tmp_path, capfd):
    if torch.cuda.is_available():
        pytest.skip("CUDA machines can run the SwiGLU fusion")
    from megatron_sft.cli import main
    from megatron_sft.testing.train_check import make_tiny_run_inputs

    ckpt, data = make_tiny_run_inputs(tmp_path)
    code = main(["train", f"output_dir={tmp_path / 'run'}", f"model.checkpoint={ckpt}", f"data.train={data}",
                 "model.swiglu_fusion=true"])
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert code == 2 and "model.swiglu_fusion=true needs CUDA" in output and "Traceback" not in output
