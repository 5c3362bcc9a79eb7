"""Generation backends behind one interface: vLLM (GPU, tensor and data parallel) and transformers (anywhere).

Both take token ids (rendered once by ``prompts``) and return n completions per prompt with their token count
and whether they ended on their own (False: cut at ``max_tokens``). vLLM gets a seed per prompt, so a resumed
run samples what an uninterrupted one would; transformers seeds each batch from its first prompt's seed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional, Protocol


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024


@dataclass
class Completion:
    text: str
    tokens: int
    finished: bool  # ended with an end-of-sequence token (False: cut at max_tokens)


class Backend(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def choose_backend(name: str) -> str:
    """``auto``: vLLM when it imports and a GPU is present, transformers otherwise."""
    if name not in ("auto", "vllm", "hf"):
        raise ValueError(f"--backend must be auto, vllm or hf, got {name!r}")
    if name != "auto":
        return name
    import torch

    return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


# ---- transformers --------------------------------------------------------------------------------------------

class HFBackend:
    """transformers ``generate``, batched with left padding; bf16 on GPU, fp32 on CPU."""

    name = "hf"

    def __init__(self, model_dir: str, batch_size: int = 16, dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(self.device).eval()
        self.batch_size = batch_size
        eos = set()
        try:
            generation_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:
            generation_eos = None
        for value in (generation_eos, self.tokenizer.eos_token_id):
            eos.update(value if isinstance(value, list) else [value] if value is not None else [])
        if not eos:
            raise ValueError(f"{model_dir}: neither the tokenizer nor generation_config.json names an eos token")
        self.eos = sorted(eos)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]:
        import torch

        results: list[list[Completion]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            torch.manual_seed(seeds[batch[0]])
            sample = sampling.temperature > 0
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    max_new_tokens=sampling.max_tokens, do_sample=sample, num_return_sequences=sampling.n,
                    temperature=sampling.temperature if sample else None, top_p=sampling.top_p if sample else None,
                    top_k=0 if sample else None, eos_token_id=self.eos, pad_token_id=self.pad)
            generated = out[:, width:].tolist()
            for row, i in enumerate(batch):
                for j in range(sampling.n):
                    results[i].append(self._completion(generated[row * sampling.n + j]))
        return results

    def _completion(self, ids: list[int]) -> Completion:
        stop = next((k for k, t in enumerate(ids) if t in self.eos), None)
        kept = ids if stop is None else ids[:stop]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Completion(text, len(kept) + (0 if stop is None else 1), stop is not None)

    def close(self) -> None:
        del self.model


# ---- vLLM ----------------------------------------------------------------------------------------------------

def _vllm_generate(llm: Any, prompts: list[list[int]], sampling: dict, seeds: list[int]) -> list[list[Completion]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(n=sampling["n"], temperature=sampling["temperature"],
                             top_p=sampling["top_p"] if sampling["temperature"] > 0 else 1.0,
                             max_tokens=sampling["max_tokens"], seed=seed) for seed in seeds]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [[Completion(o.text, len(o.token_ids), o.finish_reason != "length") for o in out.outputs]
            for out in outputs]


def _vllm_engine(model_dir: str, engine_args: dict) -> Any:
    from vllm import LLM

    return LLM(model=model_dir, **engine_args)


def _vllm_worker_main(conn: Any, gpus: str, model_dir: str, engine_args: dict) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    llm = _vllm_engine(model_dir, engine_args)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        prompts, sampling, seeds = message
        try:
            conn.send(_vllm_generate(llm, prompts, sampling, seeds))
        except Exception as err:
            conn.send(err)


CPU_KV_CACHE_GIB = 2.0  # vLLM's CPU build otherwise reserves most of the machine's memory for its KV cache


def vllm_engine_args(tensor_parallel: int, gpu_memory_utilization: float, max_model_len: Optional[int], dtype: str,
                     enforce_eager: bool, kv_cache_gib: float, on_gpu: bool) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for eval's flags. On a CPU build the KV cache is sized by the
    ``VLLM_CPU_KVCACHE_SPACE`` environment variable (set here unless the user did), and ``auto`` means float32:
    vLLM's CPU bf16 path falls back to slow kernels."""
    args: dict[str, Any] = dict(tensor_parallel_size=tensor_parallel, gpu_memory_utilization=gpu_memory_utilization,
                                dtype=dtype, enforce_eager=enforce_eager, trust_remote_code=False)
    if max_model_len:
        args["max_model_len"] = max_model_len
    if on_gpu:
        if kv_cache_gib:
            args["kv_cache_memory_bytes"] = int(kv_cache_gib * 1024**3)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib or CPU_KV_CACHE_GIB:g}")
        if dtype == "auto":
            args["dtype"] = "float32"
    return args


class VLLMBackend:
    """vLLM's offline engine; ``data_parallel`` engines (one per ``tensor_parallel`` GPUs) share the prompts."""

    name = "vllm"

    def __init__(self, model_dir: str, tensor_parallel: int = 1, data_parallel: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: Optional[int] = None, dtype: str = "auto",
                 enforce_eager: bool = False, kv_cache_gib: float = 0.0):
        engine_args = vllm_engine_args(tensor_parallel, gpu_memory_utilization, max_model_len, dtype, enforce_eager,
                                       kv_cache_gib, on_gpu=_cuda_count() > 0)
        self.workers: list[tuple[Any, Any]] = []
        self.llm = None
        if data_parallel <= 1:
            self.llm = _vllm_engine(model_dir, engine_args)
            return
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(_cuda_count())]
        if len(devices) < tensor_parallel * data_parallel:
            raise ValueError(f"data_parallel {data_parallel} x tensor_parallel {tensor_parallel} needs "
                             f"{tensor_parallel * data_parallel} GPUs, {len(devices)} visible")
        context = mp.get_context("spawn")
        for rank in range(data_parallel):
            gpus = ",".join(devices[rank * tensor_parallel:(rank + 1) * tensor_parallel])
            parent, child = context.Pipe()
            process = context.Process(target=_vllm_worker_main, args=(child, gpus, model_dir, engine_args))
            process.start()
            self.workers.append((parent, process))
        for parent, _ in self.workers:
            parent.recv()

    def generate(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[Completion]]:
        params = asdict(sampling)
        if self.llm is not None:
            return _vllm_generate(self.llm, prompts, params, seeds)
        shards = [range(len(prompts))[r::len(self.workers)] for r in range(len(self.workers))]
        for (parent, _), shard in zip(self.workers, shards):
            parent.send(([prompts[i] for i in shard], params, [seeds[i] for i in shard]))
        results: list[list[Completion]] = [[] for _ in prompts]
        for (parent, _), shard in zip(self.workers, shards):
            answer = parent.recv()
            if isinstance(answer, Exception):
                raise answer
            for i, completions in zip(shard, answer):
                results[i] = completions
        return results

    def close(self) -> None:
        for parent, process in self.workers:
            parent.send(None)
            process.join(60)
        self.workers, self.llm = [], None


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def make_backend(name: str, model_dir: str, *, batch_size: int = 16, tensor_parallel: int = 1, data_parallel: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: Optional[int] = None, dtype: str = "auto",
                 enforce_eager: bool = False, kv_cache_gib: float = 0.0) -> Backend:
    chosen = choose_backend(name)
    if chosen == "vllm":
        if not vllm_available():
            raise ValueError("--backend vllm needs vLLM: pip install 'megatron-sft[gpu]' (or use --backend hf)")
        if data_parallel == 0:
            data_parallel = max(1, _cuda_count() // tensor_parallel)
        return VLLMBackend(model_dir, tensor_parallel, data_parallel, gpu_memory_utilization, max_model_len,
                           dtype=dtype, enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib)
    return HFBackend(model_dir, batch_size=batch_size, dtype=dtype)
