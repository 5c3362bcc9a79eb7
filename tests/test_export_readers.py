"""Exports that real readers trust: bf16 round trips bit-exact (dtype and bytes) on hub-shaped configs with the real
vocabularies, config.json read alike by transformers 4.x and 5.x, sliding-window models refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sft.convert.hf_config import legacy_rope_keys
from megatron_sft.launch import run_local_workers
from megatron_sft.model.args import ModelArgs, UnsupportedModelError
from megatron_sft.testing.convert_check import assert_same_tensors, convert_and_export_worker, safetensors_tensors
from megatron_sft.testing.hub_configs import HUB_CONFIGS, save_hub_shaped_model, shrunk

REPO = Path(__file__).resolve().parents[1]
# transformers 4.x installed beside the project's 5.x (``.ci/run`` puts it here); the reader most evaluation
# stacks still pin
TRANSFORMERS4 = Path(os.environ.get("MEGATRON_SFT_TRANSFORMERS4", REPO / ".transformers4"))
SHAPES = {"qwen2.5-1.5b": 6, "llama-3.1-8b": 4}  # query heads kept: head_dim 128 and the GQA ratio stay real
INPUT_IDS = torch.randint(6, 250, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per hub shape (1 layer, real vocabulary): the bf16 HF dir, and its export with and without --dtype."""
    root = tmp_path_factory.mktemp("readers")
    out = {}
    for name, heads in SHAPES.items():
        hf = root / f"{name}-hf"
        save_hub_shaped_model(hf, shrunk(HUB_CONFIGS[name], layers=1, heads=heads))
        out[name] = {"hf": hf}
        for dtype in ([None, "bfloat16"] if name == "llama-3.1-8b" else [None]):
            export = root / f"{name}-export-{dtype}"
            run_local_workers(convert_and_export_worker, 1, str(hf), str(root / f"{name}-ckpt-{dtype}"), str(export),
                              dtype, 256 * 1024**2)
            out[name][dtype] = export
    return out


@pytest.mark.parametrize("name,dtype", [("qwen2.5-1.5b", None), ("llama-3.1-8b", None), ("llama-3.1-8b", "bfloat16")])
def test_bf16_round_trip_is_bit_exact_in_dtype_and_bytes(exports, name, dtype):
    original = safetensors_tensors(exports[name]["hf"])
    assert {t.dtype for t in original.values()} == {torch.bfloat16}
    assert original["model.embed_tokens.weight"].shape[0] == HUB_CONFIGS[name]["vocab_size"]
    assert_same_tensors(original, safetensors_tensors(exports[name][dtype]))
    config = json.loads((exports[name][dtype] / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"]) == ("bfloat16", "bfloat16")


@pytest.mark.parametrize("name", list(SHAPES))
def test_export_config_keeps_the_hub_rope_in_both_spellings(exports, name):
    hub = HUB_CONFIGS[name]
    config = json.loads((exports[name][None] / "config.json").read_text())
    assert config["rope_theta"] == hub["rope_theta"]
    assert config["rope_scaling"] == hub.get("rope_scaling")
    assert config["rope_parameters"]["rope_theta"] == hub["rope_theta"]
    from transformers import AutoConfig

    read = AutoConfig.from_pretrained(exports[name][None])  # transformers 5 reads the same RoPE
    original = AutoConfig.from_pretrained(exports[name]["hf"])
    assert read.rope_parameters == original.rope_parameters


def test_legacy_rope_keys():
    assert legacy_rope_keys({"rope_type": "default", "rope_theta": 1e6}) == {"rope_theta": 1e6, "rope_scaling": None}
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    keys = legacy_rope_keys(llama3)
    assert keys["rope_theta"] == 5e5 and keys["rope_scaling"] == {k: v for k, v in llama3.items() if k != "rope_theta"}
    with pytest.raises(ValueError, match="rope_theta"):
        legacy_rope_keys({"rope_type": "default"})


TRANSFORMERS4_LOGITS = """
import sys, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.load(sys.argv[2])).logits
torch.save(logits, sys.argv[3])
"""


def _transformers4_logits(model_dir: Path, tmp_path: Path) -> torch.Tensor:
    if not (TRANSFORMERS4 / "transformers").is_dir():
        message = (f"transformers 4.x not installed at {TRANSFORMERS4} (pip install --target {TRANSFORMERS4} "
                   "'transformers>=4.45,<5'; .ci/run does)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    ids, out = tmp_path / "ids.pt", tmp_path / "logits.pt"
    torch.save(INPUT_IDS, ids)
    env = dict(os.environ, PYTHONPATH=str(TRANSFORMERS4))
    done = subprocess.run([sys.executable, "-c", TRANSFORMERS4_LOGITS, str(model_dir), str(ids), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("name", list(SHAPES))
def test_transformers4_reads_the_export_like_transformers5(exports, name, tmp_path):
    """The real older reader on the export: same logits as transformers 5 on the original. Control: the config
    transformers 5 writes on its own (rope_parameters only) gives transformers 4 other logits."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(exports[name]["hf"], dtype=torch.float32)(INPUT_IDS).logits
    got = _transformers4_logits(exports[name][None], tmp_path)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    control = tmp_path / "rope_parameters_only"
    control.mkdir()
    config = json.loads((exports[name][None] / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key)
    (control / "config.json").write_text(json.dumps(config))
    for file in exports[name][None].iterdir():
        if file.name != "config.json":
            (control / file.name).symlink_to(file)
    wrong = _transformers4_logits(control, tmp_path)
    assert (wrong - expected).abs().max() > 1e-3, "the control should read another RoPE"


@pytest.mark.parametrize("window_layers", [0, 1])
def test_sliding_window_qwen2_is_refused(tmp_path, window_layers):
    from transformers import AutoConfig

    config = dict(shrunk(HUB_CONFIGS["qwen2.5-1.5b"], layers=2), use_sliding_window=True, sliding_window=4096,
                  max_window_layers=window_layers)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        ModelArgs.from_hf_config(AutoConfig.from_pretrained(tmp_path))


def test_hub_sliding_window_setting_that_is_off_converts(tmp_path):
    """Qwen2.5 configs carry sliding_window with use_sliding_window=false: full attention, accepted."""
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(dict(HUB_CONFIGS["qwen2.5-1.5b"], sliding_window=4096)))
    assert ModelArgs.from_hf_config(AutoConfig.from_pretrained(tmp_path)).rope_theta == 1e6


def test_convert_cli_refuses_sliding_window_in_one_line(tmp_path):
    config = dict(shrunk(HUB_CONFIGS["qwen2.5-1.5b"], layers=2), use_sliding_window=True, sliding_window=64)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "megatron_sft", "convert", "hf-to-mcore", "--hf", str(hf), "--out",
                           str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "sliding-window attention" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHAPES))
def test_full_width_bf16_round_trip_is_bit_exact(tmp_path, name):
    """The real hidden size, heads and MLP width too (1 layer; Llama-3.1-8B's is ~1.3B parameters)."""
    hf = tmp_path / "hf"
    save_hub_shaped_model(hf, shrunk(HUB_CONFIGS[name], layers=1))
    run_local_workers(convert_and_export_worker, 1, str(hf), str(tmp_path / "ckpt"), str(tmp_path / "export"), None,
                      1024**3)
    assert_same_tensors(safetensors_tensors(hf), safetensors_tensors(tmp_path / "export"))
