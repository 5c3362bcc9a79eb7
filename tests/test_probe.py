"""`megatron-sft probe` against the HF model's own token probabilities, and its recommendation rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_sft.probe import MS_FROM, MW_BELOW, recommend


def test_recommendation_follows_the_continuum():
    assert recommend(0.8)[:2] == ("model-strong (MS)", "neg_p")
    assert recommend(MS_FROM)[1] == "neg_p"
    assert recommend(0.5)[:2] == ("model-intermediate (MI)", "adaptive_mix")
    assert recommend(MW_BELOW)[1] == "adaptive_mix"
    assert recommend(0.01)[:2] == ("model-weak (MW)", "nll")
    assert "figfont" in recommend(0.01)[2] and "math" in recommend(0.8)[2]


def test_the_paper_rule_and_ours_place_mean_p_differently_between_their_boundaries():
    """midpoint: MS from 0.65, MW below 0.25; the paper's: MS above 0.5, MW below 0.1."""
    from megatron_sft.probe import other_rules

    cases = {0.05: ("nll", "nll"), 0.2: ("nll", "adaptive_mix"), 0.5: ("adaptive_mix", "adaptive_mix"),
             0.55: ("adaptive_mix", "neg_p"), 0.65: ("neg_p", "neg_p")}
    for mean_p, (midpoint, paper) in cases.items():
        assert (recommend(mean_p)[1], recommend(mean_p, "paper")[1]) == (midpoint, paper), mean_p
    assert other_rules(0.55, "midpoint") == ["paper rule (paper: MS at mean p > 0.5, MW below 0.1 (the paper's own: "
                                             "above 0.5 prior-leaning, below 0.1 NLL)): model-strong (MS) -> neg_p"]


def hf_token_p(model_dir, rows) -> tuple[list[float], list[int]]:
    """Independent reference: the HF model's p of every response token (and eos), with its response position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sft.toy.hf_loop import encode_row

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ps, positions = [], []
    for row in rows:
        prompt, response = encode_row(tokenizer, row)
        with torch.no_grad():
            logp = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        ps += logp.gather(1, torch.tensor(response)[:, None]).exp().squeeze(1).tolist()
        positions += list(range(len(response)))
    return ps, positions


def test_probe_at_tp2_matches_the_hf_model(tmp_path):
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.toy.files import write_jsonl
    from megatron_sft.toy.hf_loop import pretrain_base_model
    from megatron_sft.toy.letter_task import shift_task_rows
    from megatron_sft.launch import run_local_workers
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    save_tiny_hf_model(tmp_path / "hf", "qwen2-tied-gqa", layers=2, hidden=64)
    rows = shift_task_rows(40, seed=4)
    pretrain_base_model(tmp_path / "hf", shift_task_rows(200, seed=9), steps=60)  # spread p out
    run_local_workers(convert_hf_to_mcore, 1, tmp_path / "hf", tmp_path / "ckpt", timeout_s=300)
    write_jsonl(tmp_path / "train.jsonl", rows)

    done = subprocess.run([sys.executable, "-m", "megatron_sft", "probe", "--checkpoint", str(tmp_path / "ckpt"),
                           "--data", str(tmp_path / "train.jsonl"), "--samples", "100", "--micro-batch", "3",
                           "--nproc", "2", "--tp", "2", "--out", str(tmp_path / "probe"), "--rule", "paper"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 10_000

    p, positions = hf_token_p(tmp_path / "hf", rows)
    p_t = torch.tensor(p, dtype=torch.float64)
    assert report["rows"] == 40 and report["tokens"] == len(p)
    assert report["mean_p"] == pytest.approx(float(p_t.mean()), abs=1e-5)
    assert 0.05 < report["mean_p"] < 0.95 and p_t.std() > 0.05  # a probe of a non-degenerate model
    assert report["fraction_below_0_1"] == pytest.approx(float((p_t < 0.1).double().mean()), abs=1.5 / len(p))
    hf_hist = torch.histc(p_t, bins=20, min=0, max=1).tolist()
    assert sum(abs(a - b) for a, b in zip(report["histogram_counts"], hf_hist)) <= 2
    first = [q for q, pos in zip(p, positions) if pos == 0]
    assert report["position_edges"][:2] == [0, 1]
    assert report["position_mean_p"][0] == pytest.approx(sum(first) / len(first), abs=1e-5)
    assert report["region"] in done.stdout and report["recommended_objective"] in done.stdout
    assert report["rule"] == "paper" and (report["region"], report["recommended_objective"]) == recommend(report["mean_p"], "paper")[:2]
    assert report["other_rules"][0].startswith("midpoint rule") and report["other_rules"][0] in done.stdout


def test_probe_names_a_missing_checkpoint(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    done = subprocess.run([sys.executable, "-m", "megatron_sft", "probe", "--checkpoint", str(tmp_path / "nope"),
                           "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "nope" in done.stdout, done.stdout + done.stderr
