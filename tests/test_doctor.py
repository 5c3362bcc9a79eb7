"""megatron-sft doctor: the report's environment, skipping without CUDA, and (slow) the CPU plumbing run."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_sft.cli import main
from megatron_sft.doctor import environment, markdown


def test_environment_names_the_backend_auto_picks_and_the_packages():
    env = environment()
    assert env["torch"] == torch.__version__
    assert env["attention_backend_auto"] in ("te", "flash", "torch")
    assert set(env["packages"]) >= {"megatron-core", "transformer-engine", "flash-attn", "vllm"}
    assert env["packages"]["megatron-core"]  # installed here


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only report")
def test_without_cuda_every_gpu_step_is_skipped_with_the_reason(tmp_path, capsys):
    assert main(["doctor", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["gpu tests", "loss benchmark", "training benchmark"]
    assert {s["status"] for s in report["steps"]} == {"skipped"}
    assert all("no CUDA device" in s["detail"] for s in report["steps"])
    text = (tmp_path / "report.md").read_text()
    assert "GPU: none" in text and "attention backend for `auto`: torch" in text


def test_markdown_shows_each_trainer_and_a_failure():
    report = {"environment": {"gpu": "NVIDIA H100", "gpu_memory_gib": 80.0, "torch": "2.13", "cuda": "13.0",
                              "cudnn": 91000, "python": "3.12", "attention_backend_auto": "torch",
                              "torch_varlen_attn": True, "packages": {"transformer-engine": None}},
              "steps": [{"name": "training benchmark", "status": "ok", "seconds": 100.0, "detail": "",
                         "figures": {"trainers": {"megatron-sft (torch)": {"tokens_per_s": 41000.0, "mfu": 0.47,
                                                                           "vs_transformers": 1.6,
                                                                           "peak_bytes": 30 * 2**30}}}},
                        {"name": "gpu tests", "status": "failed", "seconds": 3.0, "detail": "1 failed",
                         "figures": {"failed": 1}}]}
    text = markdown(report)
    assert "megatron-sft (torch): 41000 tokens/s (1.60x transformers), MFU 47.0%, peak 30.00 GiB" in text
    assert "**gpu tests**: failed" in text and "1 failed" in text and "transformer-engine absent" in text


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU plumbing run")
def test_cpu_run_measures_both_trainers_and_the_loss(tmp_path):
    assert main(["doctor", "--out", str(tmp_path), "--cpu"]) == 0
    steps = {s["name"]: s for s in json.loads((tmp_path / "report.json").read_text())["steps"]}
    assert steps["gpu tests"]["figures"].get("skipped", 0) > 0 and not steps["gpu tests"]["figures"].get("failed")
    trainers = steps["training benchmark"]["figures"]["trainers"]
    assert set(trainers) == {"transformers (sdpa)", "megatron-sft (torch)"}
    assert all(f["tokens_per_s"] > 0 and f["peak_bytes"] > 0 for f in trainers.values())
    assert set(steps["loss benchmark"]["figures"]["dtypes"]) == {"float32", "bfloat16"}
