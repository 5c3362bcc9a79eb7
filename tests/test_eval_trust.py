"""Evaluation that cannot report a silent zero: missing grader libraries fail before generating, grader exceptions
end the run non-zero with a summary, vLLM's settings reach the engine, and a wheel carries its test sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_sft.cli import main
from megatron_sft.evaluation.backends import CPU_KV_CACHE_GIB, Sampling, make_backend, vllm_engine_args

REPO = Path(__file__).resolve().parents[1]
GRADED_BY = {"math500": ("math_verify", "math-verify"), "figfont": ("reasoning_gym", "reasoning-gym"),
             "humaneval_plus": ("evalplus", "evalplus")}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    path = tmp_path_factory.mktemp("eval_trust") / "model"
    save_tiny_hf_model(path, config_overrides={"max_position_embeddings": 4096})
    return path


def _fake_modules(root: Path, modules: dict[str, str]) -> dict[str, str]:
    """Write modules that shadow the installed ones; returns an environment that puts them first."""
    root.mkdir(parents=True, exist_ok=True)
    for name, body in modules.items():
        (root / f"{name}.py").write_text(body)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))


def _eval_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_sft", "eval", "--backend", "hf", *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("bench", list(GRADED_BY))
def test_missing_grader_library_fails_before_generating(tiny_model, tmp_path, bench):
    module, package = GRADED_BY[bench]
    env = _fake_modules(tmp_path / "fake", {module: f"raise ImportError('No module named {module!r}')\n"})
    out = tmp_path / "out"
    done = _eval_cli(env, "--model", str(tiny_model), "--benchmarks", bench, "--limit", "1", "--out", str(out))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert bench in lines[0] and f"pip install {package}" in lines[0] and "megatron-sft[eval]" in lines[0]
    assert not (out / bench / "generations.jsonl").exists()


BROKEN_MATH_VERIFY = """
class LatexExtractionConfig:
    pass
class ExprExtractionConfig:
    pass
def parse(*args, **kwargs):
    raise RuntimeError("parser broken on purpose")
def verify(*args, **kwargs):
    raise RuntimeError("parser broken on purpose")
"""


def test_grader_exceptions_end_the_run_non_zero_with_a_summary(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", str(tiny_model), "--benchmarks", "math500", "--limit", "2", "--out", str(out),
              "--max-tokens", "2", "--grader-workers", "1"]
    assert main(["eval", "--backend", "hf", *common]) == 0
    path = out / "math500" / "generations.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:  # right answers: a working grader scores them 1.0
        record["samples"][0]["text"] = f"so \\boxed{{{record['reference']}}}"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    env = _fake_modules(tmp_path / "fake", {"math_verify": BROKEN_MATH_VERIFY})
    done = _eval_cli(env, *common, "--regrade")
    assert done.returncode == 3, done.stdout + done.stderr
    error = [line for line in done.stdout.splitlines() if line.startswith("megatron-sft eval: error:")]
    assert len(error) == 1 and "grading failed on 2 samples (math500: 2)" in error[0], done.stdout
    assert "parser broken on purpose" in error[0] and "--regrade" in error[0]
    assert json.loads((out / "results.json").read_text())["benchmarks"]["math500"]["grader_failures"] == 2

    assert main(["eval", "--backend", "hf", *common, "--regrade"]) == 0  # the real grader: every answer right
    metrics = json.loads((out / "results.json").read_text())["benchmarks"]["math500"]
    assert (metrics["accuracy"], metrics["grader_failures"]) == (1.0, 0)


def test_vllm_engine_args_follow_the_flags(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    gpu = vllm_engine_args(2, 0.5, 4096, "bfloat16", True, 12.0, on_gpu=True)
    assert gpu == dict(tensor_parallel_size=2, gpu_memory_utilization=0.5, dtype="bfloat16", enforce_eager=True,
                       trust_remote_code=False, max_model_len=4096, kv_cache_memory_bytes=12 * 1024**3)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    cpu = vllm_engine_args(1, 0.9, None, "auto", False, 0.0, on_gpu=False)
    assert cpu["dtype"] == "float32" and "max_model_len" not in cpu and "kv_cache_memory_bytes" not in cpu
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == f"{CPU_KV_CACHE_GIB:g}"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")  # the user's setting wins
    vllm_engine_args(1, 0.9, None, "auto", False, 3.0, on_gpu=False)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"


FAKE_VLLM = '''
"""A stand-in for vLLM's offline API: records the engine arguments, answers with the seed and GPUs it ran on."""
import json, os
from types import SimpleNamespace

class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

class LLM:
    def __init__(self, model, **kwargs):
        self.gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
            f.write(json.dumps({"model": model, "gpus": self.gpus, **kwargs}) + "\\n")

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for prompt, p in zip(prompts, params):
            ids = prompt["prompt_token_ids"]
            outs.append(SimpleNamespace(outputs=[
                SimpleNamespace(text=f"sum={sum(ids)} seed={p.seed} gpus={self.gpus} k={k}", token_ids=[1] * (k + 1),
                                finish_reason="length" if k else "stop") for k in range(p.n)]))
        return outs
'''


@pytest.mark.parametrize("data_parallel", [1, 2])
def test_vllm_backend_logic_on_a_fake_engine(tmp_path, monkeypatch, data_parallel):
    """The backend's own logic without vLLM: engine settings, per-item seeds, data-parallel sharding and order."""
    fake = tmp_path / "fake"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (fake / "vllm" / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                             "    return {'prompt_token_ids': prompt_token_ids}\n")
    log = tmp_path / "engines.jsonl"
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)

    backend = make_backend("vllm", "/models/x", data_parallel=data_parallel, max_model_len=512, dtype="bfloat16",
                           enforce_eager=True, gpu_memory_utilization=0.6)
    prompts = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    seeds = [11, 22, 33, 44, 55]
    try:
        results = backend.generate(prompts, Sampling(n=2, temperature=0.7, max_tokens=9), seeds)
    finally:
        backend.close()
    engines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(engines) == data_parallel
    assert sorted(e["gpus"] for e in engines) == (["4", "5"] if data_parallel == 2 else ["4,5"])
    for engine in engines:
        assert (engine["model"], engine["max_model_len"], engine["dtype"], engine["enforce_eager"]) == \
            ("/models/x", 512, "bfloat16", True)
        assert engine["gpu_memory_utilization"] == 0.6 and engine["tensor_parallel_size"] == 1
    for prompt, seed, completions in zip(prompts, seeds, results):
        assert [c.text.split(" gpus=")[0] for c in completions] == [f"sum={sum(prompt)} seed={seed}"] * 2
        assert [(c.tokens, c.finished) for c in completions] == [(1, True), (2, False)]
    if data_parallel == 2:  # shards alternate over the engines
        assert {c[0].text.split("gpus=")[1].split()[0] for c in results[0::2]} == {"4"}
        assert {c[0].text.split("gpus=")[1].split()[0] for c in results[1::2]} == {"5"}


def test_built_wheel_carries_the_test_sets(tmp_path):
    """A wheel (what `pip install megatron-sft` gets) holds evaluation/data, and the installed package finds it."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("megatron_sft-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO / "evaluation" / "data").as_posix()
               for p in (REPO / "evaluation" / "data").rglob("*") if p.is_file()}
    assert shipped and {f"megatron_sft/eval_data/{name}" for name in shipped} <= names
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "megatron_sft").rglob("*.py")}
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)[:5]}"

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import megatron_sft; from megatron_sft.evaluation.benchmarks import BENCHMARKS, default_data_dir, "
             "load_items; print(megatron_sft.__file__); print(default_data_dir()); "
             "print(len(load_items(BENCHMARKS['math500'])), len(load_items(BENCHMARKS['humaneval_plus'])))")
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_SFT_EVAL_DATA"}
    env["PYTHONPATH"] = str(target)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    module, data_dir, counts = done.stdout.strip().splitlines()[-3:]
    assert module.startswith(str(target)) and data_dir == str(target / "megatron_sft" / "eval_data")
    assert counts == "500 164"
    done = subprocess.run([sys.executable, "-m", "megatron_sft", "--help"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # every command's module imports from the wheel
    assert done.returncode == 0 and "eval" in done.stdout, done.stderr[-2000:]


VLLM_TRANSFORMERS_PIN = ">=5.16.1,<5.20"  # vllm(-cpu) 0.32's requirement, the newest measured here


def test_transformers_range_admits_vllms_pin():
    """One environment can hold megatron-sft and vLLM: our transformers range meets vLLM's (the installed vLLM's
    own requirement when there is one)."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    setup_text = (REPO / "setup.py").read_text()
    ours = Requirement(re.search(r'"(transformers[^"]*)"', setup_text).group(1)).specifier
    theirs = SpecifierSet(VLLM_TRANSFORMERS_PIN)
    try:
        theirs = next(Requirement(r).specifier for r in md.requires("vllm") or [] if r.startswith("transformers"))
    except (md.PackageNotFoundError, StopIteration):
        pass
    candidates = [f"5.{minor}.{patch}" for minor in range(10, 30) for patch in range(3)]
    assert any(v in ours and v in theirs for v in candidates), (str(ours), str(theirs))


def test_model_directory_without_config_is_one_line(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model_args.json").write_text("{}")
    done = _eval_cli(dict(os.environ), "--model", str(tmp_path / "ckpt"), "--benchmarks", "medqa", "--out",
                     str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "no config.json" in lines[0] and "convert mcore-to-hf" in lines[0]
