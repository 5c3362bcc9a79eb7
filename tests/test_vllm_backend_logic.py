"""The vLLM backend's own logic with a stand-in engine (vLLM itself is not installable here): per-item seeds and
sampling settings reach the engine, data-parallel workers each get their own GPUs and a share of the prompts,
results come back in prompt order, a worker's error reaches the caller, and a cut generation is unfinished.

The stand-in is a package named ``vllm`` on sys.path (spawned workers inherit the path), whose ``LLM`` answers
deterministically from the prompt, the seed and the worker's ``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

import textwrap

import pytest

from megatron_sft.evaluation.backends import Sampling, VLLMBackend

FAKE_VLLM = '''
import os
from dataclasses import dataclass


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None


@dataclass
class _Output:
    text: str
    token_ids: list
    finish_reason: str


@dataclass
class _RequestOutput:
    outputs: list


class LLM:
    def __init__(self, model, **engine_args):
        self.model, self.engine_args = model, engine_args
        self.gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")

    def generate(self, prompts, params, use_tqdm=True):
        assert isinstance(params, list) and len(params) == len(prompts), "one SamplingParams per prompt"
        results = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            if ids == [666]:
                raise RuntimeError("engine failure on prompt [666]")
            outputs = [_Output(f"sum={sum(ids)} seed={p.seed} k={k} t={p.temperature} top_p={p.top_p} gpus={self.gpus}",
                               list(range(min(p.max_tokens, len(ids) + k))),
                               "length" if len(ids) + k >= p.max_tokens else "stop") for k in range(p.n)]
            results.append(_RequestOutput(outputs))
        return results
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    (package / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    for name in ("vllm", "vllm.inputs"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    return tmp_path


PROMPTS = [[1, 2], [3], [4, 5, 6], [7], [8, 9], [10]]


def test_one_engine_gets_each_items_seed_and_the_sampling(fake_vllm):
    backend = VLLMBackend("model-dir", max_model_len=64)
    out = backend.generate(PROMPTS, Sampling(n=2, temperature=0.0, top_p=0.5, max_tokens=3), seeds=[10, 11, 12, 13, 14, 15])
    assert [len(c) for c in out] == [2] * len(PROMPTS)
    assert out[2][1].text == "sum=15 seed=12 k=1 t=0.0 top_p=1.0 gpus="  # greedy: top_p forced to 1
    assert [c[0].text.split()[0] for c in out] == [f"sum={sum(p)}" for p in PROMPTS]
    assert (out[2][0].finished, out[1][0].finished) == (False, True)  # 3 tokens hit max_tokens=3: cut
    assert out[2][0].tokens == 3
    assert backend.llm.engine_args["max_model_len"] == 64 and backend.llm.engine_args["trust_remote_code"] is False
    backend.close()


def test_data_parallel_workers_share_the_prompts_in_order_each_on_its_gpus(fake_vllm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    backend = VLLMBackend("model-dir", tensor_parallel=2, data_parallel=2)
    try:
        seeds = [100 + i for i in range(len(PROMPTS))]
        out = backend.generate(PROMPTS, Sampling(temperature=0.7, top_p=0.9, max_tokens=8), seeds)
        assert [c[0].text for c in out] == [
            f"sum={sum(p)} seed={s} k=0 t=0.7 top_p=0.9 gpus={'4,5' if i % 2 == 0 else '6,7'}"
            for i, (p, s) in enumerate(zip(PROMPTS, seeds))]
        with pytest.raises(RuntimeError, match=r"engine failure on prompt \[666\]"):
            backend.generate([[1], [666]], Sampling(), [0, 1])
    finally:
        backend.close()
    assert backend.workers == []


def test_data_parallel_needs_enough_gpus(fake_vllm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match="data_parallel 2 x tensor_parallel 2 needs 4 GPUs, 2 visible"):
        VLLMBackend("model-dir", tensor_parallel=2, data_parallel=2)
