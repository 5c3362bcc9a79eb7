"""``megatron-sft eval``: generate, grade, score and tabulate, resumably.

Per benchmark, OUT/BENCH/ holds settings.json (what the generations depend on) and generations.jsonl (one
line per finished item, samples graded). A rerun with the same settings skips finished items; other settings
are refused unless --overwrite. OUT/results.json, results.csv and results.md hold the metrics.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from megatron_sft.evaluation import benchmarks as bm
from megatron_sft.evaluation.backends import Backend, Completion, Sampling, choose_backend, make_backend
from megatron_sft.evaluation.graders import check_grader_libraries, is_grader_failure
from megatron_sft.evaluation.metrics import benchmark_metrics, domain_means
from megatron_sft.evaluation.prompt_fit import PROMPT_TOO_LONG, outcome_fractions, too_long_advice, too_long_fields
from megatron_sft.evaluation.prompts import encode, render
from megatron_sft.evaluation.records import append_records, read_records, rewrite_records, write_atomic
from megatron_sft.evaluation.sandbox import UNSANDBOXED, SandboxUnavailable, choose_sandbox, outcome_counts
from megatron_sft.evaluation.tables import csv_table, default_label, markdown_table


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "HF model directory (e.g. a run's exported hf/)"})
    benchmarks: str = field(default="math", metadata={"help": "benchmarks or domains, comma-separated"})
    out: str = field(default="eval", metadata={"help": "output directory"})
    label: str = field(default="", metadata={
        "help": "name of this run in tables (default: the run directory for a run's hf/ export, else the model directory)"})
    backend: str = field(default="auto", metadata={"help": "auto (vLLM on GPU when installed, else hf) | vllm | hf"})
    template: str = field(default="chat", metadata={"help": "chat (tokenizer chat template) | plain"})
    plain_template: str = field(default="{prompt}\n", metadata={"help": "format string for --template plain"})
    n: int = field(default=1, metadata={"help": "samples per item (avg@n, pass@k)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling top_p"})
    max_tokens: int = field(default=0, metadata={"help": "generation budget (0: the benchmark's default)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    pass_k: str = field(default="", metadata={"help": "k values for pass@k, comma-separated (default 1,2,4..n)"})
    limit: int = field(default=0, metadata={"help": "first N items of each benchmark (0: all)"})
    tensor_parallel: int = field(default=1, metadata={"help": "vLLM tensor-parallel GPUs per engine"})
    data_parallel: int = field(default=0, metadata={"help": "vLLM engines (default 0: all visible GPUs / tensor_parallel)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "vLLM: fraction of each GPU's memory for weights + KV cache (lower it on a shared GPU)"})
    max_model_len: int = field(default=0, metadata={
        "help": "context length in tokens for both backends; longer prompts are not generated (0: the model's)"})
    dtype: str = field(default="auto", metadata={
        "help": "generation dtype: auto (GPU: bfloat16 for transformers, vLLM's pick from the export; CPU: float32, "
                "since bf16 kernels are slow there) | bfloat16 | float16 | float32"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "vLLM: no CUDA graphs (faster start, less memory, slower decoding)"})
    kv_cache_gib: float = field(default=0.0, metadata={
        "help": "vLLM KV-cache size in GiB (0: vLLM's default, a share of --gpu-memory-utilization on GPU; "
                "on a CPU build 2 GiB instead of vLLM's most-of-RAM; $VLLM_CPU_KVCACHE_SPACE wins there)"})
    batch_size: int = field(default=16, metadata={"help": "hf backend: prompts per generate call"})
    chunk: int = field(default=512, metadata={"help": "items generated and saved per step (resume granularity)"})
    grader_workers: int = field(default=4, metadata={"help": "grading processes"})
    grader_timeout: float = field(default=60.0, metadata={"help": "seconds per graded sample before it scores 0"})
    figfont_seed: int = field(default=2026, metadata={"help": "reasoning-gym seed of the figfont test puzzles"})
    figfont_size: int = field(default=200, metadata={"help": "figfont test puzzles"})
    data_dir: str = field(default="", metadata={"help": "test sets (default evaluation/data or $MEGATRON_SFT_EVAL_DATA)"})
    regrade: bool = field(default=False, metadata={"help": "grade the saved generations again (no generation)"})
    overwrite: bool = field(default=False, metadata={"help": "discard saved generations made with other settings"})
    sandbox: str = field(default="auto", metadata={
        "help": "isolation of model-written code: auto (the first that works) | bwrap | unshare | os-unshare"})
    allow_unsandboxed_code: bool = field(default=False, metadata={
        "help": "grade code with evalplus's guard only when no sandbox works (recorded in results.json)"})
    # alpacaeval's judge (evaluation/judge.py): a local model or an OpenAI-compatible endpoint
    judge_model: str = field(default="", metadata={"help": "alpacaeval judge: a local HF model directory"})
    judge_url: str = field(default="", metadata={
        "help": "alpacaeval judge: an OpenAI-compatible endpoint (e.g. https://api.openai.com/v1), with --judge-name"})
    judge_name: str = field(default="", metadata={"help": "model name sent to --judge-url (e.g. gpt-4-1106-preview)"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "environment variable holding --judge-url's API key (read at run time, never saved or printed)"})
    judge_logprobs: bool = field(default=False, metadata={
        "help": "--judge-url: weigh each verdict by the judge's probabilities of m and M, as AlpacaEval 2's "
                "annotator does (the endpoint must return top logprobs)"})
    judge_backend: str = field(default="auto", metadata={"help": "--judge-model's backend: auto | vllm | hf"})
    judge_tensor_parallel: int = field(default=0, metadata={
        "help": "vLLM tensor-parallel GPUs of --judge-model (default 0: --tensor-parallel)"})
    judge_max_tokens: int = field(default=16, metadata={"help": "judge answer budget (its verdict is m or M)"})
    judge_workers: int = field(default=8, metadata={"help": "concurrent requests to --judge-url"})

    def validate(self) -> None:
        if not self.model:
            raise ValueError("--model is required (an HF model directory)")
        if not Path(self.model).is_dir():
            raise ValueError(f"--model {self.model}: not a directory (export a run with megatron-sft convert "
                             "mcore-to-hf, or give an HF model directory)")
        if not (Path(self.model) / "config.json").is_file():
            hint = (" (a megatron-sft checkpoint: export it with megatron-sft convert mcore-to-hf)"
                    if (Path(self.model) / "model_args.json").is_file() else "")
            raise ValueError(f"--model {self.model}: no config.json, not a Hugging Face model directory{hint}; "
                             "point it at an export (a run's hf/ directory)")
        if self.template not in ("chat", "plain"):
            raise ValueError(f"--template must be chat or plain, got {self.template!r}")
        if "{prompt}" not in self.plain_template:
            raise ValueError("--plain-template must contain {prompt}")
        if self.data_parallel < 0:
            raise ValueError("--data-parallel must be >= 0 (0: all visible GPUs)")
        for name in ("n", "chunk", "grader_workers", "batch_size", "tensor_parallel", "figfont_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"--dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1 or self.kv_cache_gib < 0 or self.max_model_len < 0:
            raise ValueError("--gpu-memory-utilization must be in (0, 1], --kv-cache-gib and --max-model-len >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.n > 1 and self.temperature == 0:
            print("note: n > 1 with temperature 0 repeats the greedy answer; set --temperature for avg@n / pass@k")
        self.ks()
        from megatron_sft.evaluation.alpacaeval import check_judge_config

        check_judge_config(self, bm.resolve_benchmarks(self.benchmarks))  # a judged benchmark without a judge: refused

    def ks(self) -> Optional[list[int]]:
        if not self.pass_k:
            return None
        try:
            ks = [int(k) for k in self.pass_k.split(",") if k.strip()]
        except ValueError:
            raise ValueError(f"--pass-k must be integers, e.g. 1,4,8; got {self.pass_k!r}") from None
        if any(k < 1 or k > self.n for k in ks):
            raise ValueError(f"--pass-k values must be in 1..n={self.n}")
        return ks


def config_fields() -> list[Any]:
    return list(fields(EvalConfig))


def generation_settings(config: EvalConfig, bench: bm.Benchmark, tokenizer_name: str) -> dict[str, Any]:
    """What the saved generations of ``bench`` depend on (a resumed run must match it)."""
    settings = {"model": str(Path(config.model).resolve()), "benchmark": bench.name, "template": config.template,
                "instruction": bench.instruction, "n": config.n, "temperature": config.temperature,
                "top_p": config.top_p, "max_tokens": config.max_tokens or bench.max_tokens, "seed": config.seed,
                "tokenizer": tokenizer_name}
    if config.template == "plain":
        settings["plain_template"] = config.plain_template
    if bench.name == "figfont":
        settings.update(figfont_seed=config.figfont_seed, figfont_size=config.figfont_size)
    return settings


# what a sample keeps from generation; the rest is grading
GENERATION_FIELDS = ("text", "tokens", "finished", "note", PROMPT_TOO_LONG, "prompt_tokens")


def item_seed(seed: int, item_id: str) -> int:
    return random.Random(f"{seed}:{item_id}").randrange(2**31)


class Evaluation:
    def __init__(self, config: EvalConfig):
        from transformers import AutoConfig, AutoTokenizer

        config.validate()
        self.config = config
        self.out = Path(config.out)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        model_config = AutoConfig.from_pretrained(config.model)
        self.model_limit = getattr(model_config, "max_position_embeddings", None)
        self.context = config.max_model_len or self.model_limit or 10**9
        self.backend_name = choose_backend(config.backend)
        self._backend: Optional[Backend] = None
        self.data_dir = Path(config.data_dir) if config.data_dir else None
        self.options = {"figfont_seed": config.figfont_seed, "figfont_size": config.figfont_size,
                        "sandbox": config.sandbox, "allow_unsandboxed_code": config.allow_unsandboxed_code}

    @property
    def backend(self) -> Backend:
        if self._backend is None:  # loaded only when something is left to generate
            c = self.config
            self._backend = make_backend(self.backend_name, c.model, batch_size=c.batch_size,
                                         tensor_parallel=c.tensor_parallel, data_parallel=c.data_parallel,
                                         gpu_memory_utilization=c.gpu_memory_utilization,
                                         max_model_len=c.max_model_len or None, dtype=c.dtype,
                                         enforce_eager=c.enforce_eager, kv_cache_gib=c.kv_cache_gib)
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()

    # -- one benchmark ------------------------------------------------------------------------------------------

    def run_benchmark(self, bench: bm.Benchmark) -> dict[str, float]:
        from tqdm import tqdm

        c = self.config
        bench_dir = self.out / bench.name
        settings = generation_settings(c, bench, type(self.tokenizer).__name__)
        self._check_settings(bench_dir, settings)
        generations = bench_dir / "generations.jsonl"
        items = bm.load_items(bench, self.data_dir, self.options, c.limit or None)
        done = read_records(generations)
        grading = GradingContext(bench, self.data_dir, bench_dir, self.options)
        if c.regrade and done:
            self._regrade(bench, done, grading, generations)
        todo = [item for item in items if item.id not in done]
        sampling = Sampling(c.n, c.temperature, c.top_p, c.max_tokens or bench.max_tokens)
        progress = tqdm(total=len(items), initial=len(items) - len(todo), desc=bench.name, unit="item",
                        dynamic_ncols=True)
        for start in range(0, len(todo), c.chunk):
            chunk = todo[start:start + c.chunk]
            records = self._generate(chunk, bench, sampling)
            self._grade(records, bench, grading)
            append_records(generations, records)
            for record in records:
                done[record["id"]] = record
            progress.update(len(chunk))
        progress.close()
        if bench.grader == "judge":  # an LLM judge compares the answers with the references (alpacaeval.py)
            from megatron_sft.evaluation.alpacaeval import judge_benchmark

            self.close()
            self._backend = None  # a local judge may need the GPUs
            return judge_benchmark(c, bench, items, done, bench_dir)
        scores = [[s["score"] for s in done[item.id]["samples"]] for item in items]
        metrics = benchmark_metrics(scores, c.ks())
        samples = [s for item in items for s in done[item.id]["samples"]]
        metrics["accuracy"] = metrics[f"avg@{c.n}"]
        metrics.update(outcome_fractions(samples))  # no answer / truncated / prompt longer than the context, apart
        metrics["mean_tokens"] = sum(s["tokens"] for s in samples) / len(samples)
        if bench.grader == "code":
            metrics["base_accuracy"] = sum(s.get("base", 0.0) for s in samples) / len(samples)
            metrics.update(outcome_counts(samples))  # passed / failed / timeout / sandbox errors, apart
        metrics["grader_failures"] = sum(1 for s in samples if is_grader_failure(s))
        return metrics

    def _check_settings(self, bench_dir: Path, settings: dict) -> None:
        path = bench_dir / "settings.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != settings:
                changed = {k: (saved.get(k), settings.get(k)) for k in set(saved) | set(settings)
                           if saved.get(k) != settings.get(k)}
                if not self.config.overwrite:
                    raise ValueError(f"{bench_dir} holds generations made with other settings "
                                     f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in sorted(changed.items()))}); "
                                     "use another --out, or --overwrite to discard them")
                shutil.rmtree(bench_dir)
        bench_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(settings, indent=2) + "\n")

    def _generate(self, items: list[bm.Item], bench: bm.Benchmark, sampling: Sampling) -> list[dict]:
        c = self.config
        texts = [render(self.tokenizer, item.question, bench.instruction, c.template, c.plain_template) for item in items]
        ids = [encode(self.tokenizer, text, c.template) for text in texts]
        fits = [i for i, p in enumerate(ids) if len(p) < self.context]
        completions: list[list[Completion]] = [[Completion("", 0, False)] * c.n for _ in items]
        if fits:
            generated = self.backend.generate([ids[i] for i in fits], sampling,
                                              [item_seed(c.seed, items[i].id) for i in fits])
            for i, result in zip(fits, generated):
                completions[i] = result
        records = []
        for i, (item, text) in enumerate(zip(items, texts)):
            samples = [{"text": comp.text, "tokens": comp.tokens, "finished": comp.finished} for comp in completions[i]]
            if i not in fits:
                for sample in samples:
                    sample.update(too_long_fields(len(ids[i]), self.context))
            records.append({"id": item.id, "prompt": text, "reference": item.reference, "meta": item.meta,
                            "samples": samples})
        return records

    def _grade(self, records: list[dict], bench: bm.Benchmark, grading: "GradingContext") -> None:
        from megatron_sft.evaluation.graders import grade
        from megatron_sft.evaluation.workers import grade_in_workers

        if bench.grader == "judge":
            return  # judged after generation, against the references (judge_benchmark)
        tasks, where = [], []
        grading.prepare(records)
        for r, record in enumerate(records):
            meta = grading.meta(record)
            for s, sample in enumerate(record["samples"]):
                tasks.append((bench.grader, sample["text"], record["reference"], meta))
                where.append((r, s))
        timeout = self.config.grader_timeout * (4 if bench.grader == "code" else 1)
        results = grade_in_workers(grade, tasks, self.config.grader_workers, timeout)
        for (r, s), result in zip(where, results):  # a re-grade replaces every earlier grading field
            sample = records[r]["samples"][s]
            generated = {key: sample[key] for key in GENERATION_FIELDS if key in sample}
            sample.clear()
            sample.update({**generated, "pred": None, **result})

    def _regrade(self, bench: bm.Benchmark, done: dict[str, dict], grading: "GradingContext", path: Path) -> None:
        records = list(done.values())
        print(f"{bench.name}: grading {len(records)} saved items again")
        self._grade(records, bench, grading)
        rewrite_records(path, records)

    # -- all benchmarks -----------------------------------------------------------------------------------------

    def run(self) -> dict:
        c = self.config
        chosen = bm.resolve_benchmarks(c.benchmarks)
        check_grader_libraries((bench.name, bench.grader) for bench in chosen)
        sandbox = code_sandbox(c.sandbox, c.allow_unsandboxed_code) if any(b.grader == "code" for b in chosen) else None
        self.out.mkdir(parents=True, exist_ok=True)
        previous = self.out / "results.json"
        results = json.loads(previous.read_text()) if previous.is_file() else {"benchmarks": {}}
        if sandbox:  # how model-written code ran; "none" means unsandboxed (--allow-unsandboxed-code)
            results["code_sandbox"] = {"mechanism": sandbox, "unsandboxed": sandbox == UNSANDBOXED}
        results.update({"model": str(Path(c.model).resolve()), "label": c.label or default_label(c.model),
                        "backend": self.backend_name, "config": asdict(c)})
        started = time.time()
        try:
            for bench in chosen:
                metrics = self.run_benchmark(bench)
                results["benchmarks"][bench.name] = {"title": bench.title, "domain": bench.domain, **metrics}
                self._write(results)
                too_long = metrics.get(PROMPT_TOO_LONG, 0.0)
                print(f"{bench.name}: accuracy {100 * metrics['accuracy']:.1f}% over {int(metrics['items'])} items "
                      f"x {int(metrics['samples'])} samples (no answer {100 * metrics['no_answer']:.0f}%, "
                      f"truncated {100 * metrics['truncated']:.0f}%"
                      f"{f', prompt longer than the context {100 * too_long:.0f}%' if too_long else ''})", flush=True)
                if too_long:
                    print(too_long_advice(bench.name, metrics, self.context, self.model_limit, c.max_model_len,
                                          c.template), flush=True)
        finally:
            self.close()
        results["seconds"] = round(time.time() - started, 1)
        self._write(results)
        raise_on_grader_failures(results, self.out)
        return results

    def _write(self, results: dict) -> None:
        domains = {name: m["domain"] for name, m in results["benchmarks"].items()}
        results["domains"] = {d: {"accuracy": v} for d, v in
                              domain_means(results["benchmarks"], domains, "accuracy").items()}
        write_atomic(self.out / "results.json", json.dumps(results, indent=2) + "\n")
        label = [results["label"]]
        write_atomic(self.out / "results.md", markdown_table([results], label))
        write_atomic(self.out / "results.csv", csv_table([results], label))


class GradingIncomplete(RuntimeError):
    """Some samples scored 0 because grading failed; the results are written but must not be trusted."""


def raise_on_grader_failures(results: dict, out: Path) -> None:
    """A run whose grader raised on some samples ends non-zero, naming the benchmarks and the first errors."""
    failed = {name: int(m.get("grader_failures", 0)) for name, m in results["benchmarks"].items()}
    failed = {name: count for name, count in failed.items() if count}
    if not failed:
        return
    examples = []
    for name in failed:
        for record in read_records(out / name / "generations.jsonl").values():
            examples += [s["error"] for s in record["samples"] if is_grader_failure(s)]
    distinct = sorted(set(examples), key=examples.index)[:3]
    sandbox_errors = sum(int(m.get("sandbox_errors", 0)) for m in results["benchmarks"].values())
    raise GradingIncomplete(
        f"grading failed on {sum(failed.values())} samples ({', '.join(f'{k}: {v}' for k, v in failed.items())}"
        f"{f'; {sandbox_errors} sandbox errors, not model failures' if sandbox_errors else ''}), "
        f"which scored 0: {'; '.join(distinct)}. Fix the grader, then re-grade the saved generations with --regrade"
    )


class GradingContext:
    """What graders need beyond the record: the options (stored), and for code the evalplus problem and its
    expected outputs (computed once, cached in the benchmark directory)."""

    def __init__(self, bench: bm.Benchmark, data_dir: Optional[Path], bench_dir: Path, options: dict):
        self.bench = bench
        self.problems: dict[str, dict] = {}
        self.expected: dict[str, dict] = {}
        if bench.grader == "code":
            from megatron_sft.evaluation.code_tasks import evalplus_dataset, load_problems

            self.dataset = evalplus_dataset(bench.name)
            self.problems = load_problems((data_dir or bm.default_data_dir()) / bench.source, self.dataset)
            self.cache = bench_dir / "expected_outputs.pkl"
            self.sandbox = code_sandbox(options.get("sandbox", "auto"), options.get("allow_unsandboxed_code", False))

    def prepare(self, records: list[dict]) -> None:
        """Expected outputs of the code tasks among ``records``, computed in one go."""
        if self.bench.grader == "code":
            from megatron_sft.evaluation.code_tasks import expected_outputs

            missing = [r["reference"] for r in records if r["reference"] not in self.expected]
            for task_id in missing:
                if task_id not in self.problems:
                    raise bm.BenchmarkError(f"{self.bench.name}: task {task_id!r} of the saved generations is not "
                                            f"in {self.bench.source}")
            if missing:
                self.expected.update(expected_outputs(self.problems, missing, self.dataset, self.cache))

    def meta(self, record: dict) -> dict:
        if self.bench.grader != "code":
            return record.get("meta", {})
        task_id = record["reference"]
        return {"dataset": self.dataset, "problem": self.problems[task_id], "expected": self.expected[task_id],
                "sandbox": self.sandbox}


def code_sandbox(requested: str, allow_unsandboxed: bool) -> str:
    """The sandbox mechanism for code benchmarks (probed once per process); none works: refused, up front."""
    try:
        return choose_sandbox(requested, allow_unsandboxed)
    except SandboxUnavailable as err:
        raise bm.BenchmarkError(f"code benchmarks refused: {err}") from None


def evaluate(config: EvalConfig) -> dict:
    return Evaluation(config).run()
