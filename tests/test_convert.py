"""HF <-> megatron-core conversion: bit-exact round trips, logits parity at TP/PP, resharding, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_sft.convert.hf_to_mcore import ConversionError, convert_hf_to_mcore
from megatron_sft.launch import run_local_workers
from megatron_sft.model.args import ModelArgs, UnsupportedModelError
from megatron_sft.model.builder import build_transformer_config
from megatron_sft.testing.convert_check import (
    assert_same_tensors, convert_and_export_worker, first_result, logits_worker, safetensors_tensors,
)
from megatron_sft.toy.tiny_models import TINY_VARIANTS, save_tiny_hf_model

INPUT_IDS = torch.randint(6, 250, (2, 24), generator=torch.Generator().manual_seed(0))


def _safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    return safetensors_tensors(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every tiny variant: HF dir, converted checkpoint, exported HF dir, HF logits on INPUT_IDS."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for variant in TINY_VARIANTS:
        hf_dir, ckpt, export = root / f"{variant}-hf", root / f"{variant}-ckpt", root / f"{variant}-export"
        model = save_tiny_hf_model(hf_dir, variant)
        with torch.no_grad():
            logits = model(INPUT_IDS).logits
        run_local_workers(convert_and_export_worker, 1, str(hf_dir), str(ckpt), str(export))
        out[variant] = dict(hf=hf_dir, ckpt=ckpt, export=export, logits=logits)
    return out


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_hf_to_mcore_to_hf_is_bit_exact(converted, variant):
    paths = converted[variant]
    original, exported = _safetensors_dir(paths["hf"]), _safetensors_dir(paths["export"])
    assert_same_tensors(original, exported)
    index = json.loads((paths["export"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original) and len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_export_loads_in_transformers_with_tokenizer_and_chat_template(converted, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = converted[variant]
    model = AutoModelForCausalLM.from_pretrained(paths["export"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT_IDS).logits, paths["logits"], atol=0, rtol=0)
    tok, ref_tok = AutoTokenizer.from_pretrained(paths["export"]), AutoTokenizer.from_pretrained(paths["hf"])
    chat = [{"role": "user", "content": "1 + 2 ?"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)
    args = json.loads((paths["ckpt"] / "model_args.json").read_text())
    assert args["padded_vocab_size"] % 128 == 0 and args["vocab_size"] == 250


@pytest.mark.parametrize("variant", ["qwen2-tied-gqa", "llama-untied-mha-rope-scaled"])
@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (2, 2)], ids=["tp1", "tp2", "tp2xpp2"])
def test_megatron_logits_equal_hf_logits(converted, variant, layout):
    tp, pp = layout
    paths = converted[variant]
    logits = first_result(run_local_workers(logits_worker, tp * pp, str(paths["ckpt"]), tp, pp, INPUT_IDS))
    torch.testing.assert_close(logits, paths["logits"], atol=1e-5, rtol=1e-5)


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(converted, tmp_path):
    paths = converted["qwen2-tied-gqa"]
    resaved = tmp_path / "saved-at-tp2"
    tp2 = first_result(run_local_workers(logits_worker, 2, str(paths["ckpt"]), 2, 1, INPUT_IDS, str(resaved)))
    assert (resaved / "model_args.json").is_file() and (resaved / "tokenizer" / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary directories left behind"
    tp1_original = first_result(run_local_workers(logits_worker, 1, str(paths["ckpt"]), 1, 1, INPUT_IDS))
    tp1 = first_result(run_local_workers(logits_worker, 1, str(resaved), 1, 1, INPUT_IDS))
    pp2 = first_result(run_local_workers(logits_worker, 2, str(resaved), 1, 2, INPUT_IDS))
    assert torch.equal(tp1, tp1_original), "weights changed through a TP=2 save"
    torch.testing.assert_close(pp2, tp1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tp2, tp1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tp1, paths["logits"], atol=1e-5, rtol=1e-5)


# --- refusals (no process group needed: they fail before any model is built) -------------------------------

def test_refuses_existing_output_directory(converted, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        convert_hf_to_mcore(converted["qwen2-tied-gqa"]["hf"], tmp_path / "out")


def test_refuses_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*is not supported"):
        convert_hf_to_mcore(tmp_path / "gpt2", tmp_path / "out")


def test_refuses_shapes_that_disagree_with_config(converted, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(converted["qwen2-tied-gqa"]["hf"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"mlp.gate_proj.weight' has shape \(128, 64\) but config.json implies \(96, 64\)"):
        convert_hf_to_mcore(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_tensor_parallel_that_does_not_divide_kv_heads(converted):
    args = ModelArgs.load(converted["qwen2-tied-gqa"]["ckpt"] / "model_args.json")
    with pytest.raises(ValueError, match="tensor_parallel=4 does not divide the 2 KV heads"):
        build_transformer_config(args, tensor_parallel=4)
    with pytest.raises(ValueError, match="tensor_parallel=3 does not divide the 4 attention heads"):
        build_transformer_config(args, tensor_parallel=3)
