"""AlpacaEval 2: answers to the AlpacaEval instructions, judged against the reference outputs, scored by
alpaca-eval's own code.

Test set (``DATA_DIR/alpacaeval/``): ``alpaca_eval.json`` in its published format (a JSON list of
{instruction, output, generator, dataset}; AlpacaEval 2's reference is ``alpaca_eval_gpt4_baseline.json``
of the tatsu-lab/alpaca_eval dataset, GPT-4 Turbo's outputs) and ``df_gamed.csv`` of the same dataset, which
alpaca-eval's length-controlled GLM reads (instruction difficulty and the regularising "gamed" baselines);
alpaca-eval would download it from the hub, here it is read from the local copy instead.

After generation, each item's first sample and the reference go to the judge (``judge.py``) in the order
alpaca-eval would randomise them; judgements are appended to ``OUT/alpacaeval/judgements.jsonl`` per chunk
(resumable; their settings in ``judge_settings.json``). The win rate and the length-controlled win rate
come from ``alpaca_eval.metrics.glm_winrate.get_length_controlled_winrate`` on the annotations in the test
set's order (its GLM indexes instruction difficulty by that position).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import shutil
import sys
import types
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

from megatron_sft.evaluation import benchmarks as bm
from megatron_sft.evaluation.graders import GraderUnavailable
from megatron_sft.evaluation.judge import (
    JudgeUnavailable,
    judge_identity,
    judge_messages,
    make_judge,
)
from megatron_sft.evaluation.records import append_records, read_records, write_atomic

REFERENCE_FILE = "alpaca_eval.json"
GAMED_FILE = "df_gamed.csv"
INSTALL = "pip install 'megatron-sft[eval]' (or pip install alpaca-eval)"


@contextlib.contextmanager
def _pkg_resources_shim() -> Iterator[None]:
    """alpaca-eval 0.6 imports ``pkg_resources`` (for two version helpers); setuptools >= 81 no longer ships it.
    While alpaca-eval is imported, those two helpers (from ``packaging`` and ``importlib.metadata``) stand in
    when the real module is missing; the stand-in is taken out of ``sys.modules`` afterwards, so that nothing
    else (pytest, setuptools) mistakes it for the real one."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from packaging.version import parse

        shim = types.ModuleType("pkg_resources")
        shim.parse_version = parse  # type: ignore[attr-defined]
        shim.get_distribution = lambda name: types.SimpleNamespace(  # type: ignore[attr-defined]
            version=importlib.metadata.version(name))
        sys.modules["pkg_resources"] = shim
        try:
            yield
        finally:
            if sys.modules.get("pkg_resources") is shim:
                del sys.modules["pkg_resources"]
        return
    yield


@lru_cache(maxsize=1)
def alpaca_eval_package() -> types.ModuleType:
    """The ``alpaca_eval`` package with the modules used here imported, or a one-line GraderUnavailable."""
    try:
        with _pkg_resources_shim():
            package = importlib.import_module("alpaca_eval")
            for name in ("metrics.glm_winrate", "utils", "completion_parsers", "processors"):
                importlib.import_module(f"alpaca_eval.{name}")
    except Exception as err:  # ImportError, or a broken install raising anything at import
        raise GraderUnavailable(f"alpacaeval is scored by alpaca-eval's own code, which does not import "
                                f"({type(err).__name__}: {err}); install it with: {INSTALL}") from None
    return package


# ---- test set -------------------------------------------------------------------------------------------------

def load_alpacaeval(bench: bm.Benchmark, data_dir: Path, options: dict) -> list[bm.Item]:
    """The instructions with their reference outputs, ids = positions (what the GLM indexes)."""
    path = bm.existing(data_dir / bench.source)
    bm.existing(data_dir / "alpacaeval" / GAMED_FILE)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise bm.BenchmarkError(f"{path}:{err.lineno}: not JSON ({err.msg}); re-download the file") from None
    if not isinstance(rows, list):
        raise bm.BenchmarkError(f"{path}: expected a JSON list of {{instruction, output, generator, dataset}} records")
    items = []
    for index, row in enumerate(rows):
        where = f"{path} record {index}"
        if not isinstance(row, dict):
            raise bm.BenchmarkError(f"{where}: expected an object with instruction, output, generator")
        instruction = bm._require(row, "instruction", where)
        output, generator = row.get("output"), bm._require(row, "generator", where)
        if not isinstance(output, str):
            raise bm.BenchmarkError(f"{where}: field 'output' (the reference answer) is missing")
        items.append(bm.Item(str(index), instruction, output, {"generator": generator, "dataset": row.get("dataset")}))
    return items


def check_judge_config(config: Any, chosen: list[bm.Benchmark]) -> None:
    """Before anything runs: a judged benchmark needs exactly one judge, sane judge flags, alpaca-eval
    importable and both test files; each failure is one line naming the flag or file."""
    if not any(bench.grader == "judge" for bench in chosen):
        return
    if not config.judge_model and not config.judge_url:
        raise ValueError("alpacaeval needs a judge: --judge-model HF_DIR (a local model, run with --judge-backend "
                         "vllm or hf) or --judge-url URL --judge-name MODEL (an OpenAI-compatible endpoint; API key "
                         "from $OPENAI_API_KEY or the variable --judge-api-key-env names)")
    if config.judge_model and config.judge_url:
        raise ValueError("give one judge: --judge-model or --judge-url, not both")
    if config.judge_url and not config.judge_name:
        raise ValueError("--judge-url needs --judge-name, the model name the endpoint serves (e.g. gpt-4-1106-preview)")
    if config.judge_url and not config.judge_url.startswith(("http://", "https://")):
        raise ValueError(f"--judge-url must start with http:// or https://, got {config.judge_url!r}")
    if config.judge_model and not (Path(config.judge_model) / "config.json").is_file():
        raise ValueError(f"--judge-model {config.judge_model}: not a Hugging Face model directory (no config.json)")
    if config.judge_logprobs and config.judge_model:
        raise ValueError("--judge-logprobs needs --judge-url (local judges give discrete verdicts)")
    for name in ("judge_max_tokens", "judge_workers"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if config.judge_backend not in ("auto", "vllm", "hf") or config.judge_tensor_parallel < 0:
        raise ValueError("--judge-backend must be auto, vllm or hf and --judge-tensor-parallel >= 0")
    alpaca_eval_package()
    data_dir = Path(config.data_dir) if config.data_dir else bm.default_data_dir()
    for name in (REFERENCE_FILE, GAMED_FILE):
        if not (data_dir / "alpacaeval" / name).is_file():
            raise bm.BenchmarkError(f"{data_dir / 'alpacaeval' / name}: AlpacaEval file not found; get it from the "
                                    "tatsu-lab/alpaca_eval dataset (README, Evaluation) or point --data-dir elsewhere")


# ---- scoring ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def local_gamed_file(path: Path) -> Iterator[None]:
    """alpaca-eval's GLM fetches ``df_gamed.csv`` with ``hf_hub_download``; within this block that call gets the
    local copy (and anything else it would download fails, naming it)."""
    glm = alpaca_eval_package().metrics.glm_winrate
    original = glm.hf_hub_download

    def local(**kwargs: Any) -> str:
        if kwargs.get("filename") != GAMED_FILE:
            raise bm.BenchmarkError(f"alpaca-eval asked for {kwargs.get('filename')!r}, which is not kept locally")
        return str(bm.existing(path))

    glm.hf_hub_download = local
    try:
        yield
    finally:
        glm.hf_hub_download = original


def winrates(annotations: list[dict], gamed: Path) -> dict[str, float]:
    """alpaca-eval's win rate and length-controlled win rate (percent) of annotations in test-set order;
    preference 1 = the reference (output_1) won, 2 = the model, 1.5 = a draw, None = no verdict (left out)."""
    glm = alpaca_eval_package().metrics.glm_winrate
    with local_gamed_file(gamed), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.8-1.9 on alpaca-eval's `penalty=` (setup.py pins < 1.10)
        metrics = glm.get_length_controlled_winrate(annotations, save_weights_dir=None,
                                                    is_add_glm_preference_inplace=False)
    return {key: float(value) for key, value in metrics.items()}


def switched(instructions: list[str]) -> list[bool]:
    """Which items show the model's output first: alpaca-eval's own order randomisation (its
    RandomSwitchTwoColumnsProcessor as its pairwise annotator sets it up, seeded by the instruction and the
    annotator's default seed 123), so an item is shown the same way in every run."""
    import pandas as pd

    processors = alpaca_eval_package().processors
    switch = processors.RandomSwitchTwoColumnsProcessor(
        two_columns_to_switch=["output_1", "output_2"], random_seed_columns=["instruction"],
        _switch_column="is_switched_outputs", seed=123)
    frame = pd.DataFrame({"instruction": instructions, "output_1": "", "output_2": ""})
    return [bool(x) for x in switch.preprocess(frame)["is_switched_outputs"]]


# ---- judging, resumably -------------------------------------------------------------------------------------------

def _check_judge_settings(bench_dir: Path, settings: dict, rejudge: bool) -> None:
    """Judgements of another judge (or prompt, or verdict mode) are not mixed in: refused, naming what changed,
    unless --regrade / --overwrite, which judge again."""
    path, judgements = bench_dir / "judge_settings.json", bench_dir / "judgements.jsonl"
    if path.is_file() and judgements.is_file():
        saved = json.loads(path.read_text())
        changed = {k: (saved.get(k), settings.get(k)) for k in set(saved) | set(settings) if saved.get(k) != settings.get(k)}
        if changed and not rejudge:
            raise ValueError(f"{judgements} holds judgements made with other judge settings "
                             f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in sorted(changed.items()))}); use "
                             "another --out, or --regrade to judge the saved answers again")
    if rejudge and judgements.is_file():
        shutil.move(str(judgements), str(bench_dir / "judgements.previous.jsonl"))
    write_atomic(path, json.dumps(settings, indent=2) + "\n")


def _judge_chunk(judge: Any, items: list[bm.Item], answers: dict[str, str], seed: int) -> list[dict]:
    """Judgements of ``items``: identical outputs are a draw without asking (as alpaca-eval does); otherwise the
    pair in alpaca-eval's order, the verdict turned back into 1 = reference better, 2 = model better."""
    from megatron_sft.evaluation.runner import item_seed

    flips = switched([item.question for item in items])
    records: list[Optional[dict]] = []
    asked, conversations = [], []
    for item, flip in zip(items, flips):
        answer = answers[item.id]
        if answer.strip() == str(item.reference).strip():
            records.append({"id": item.id, "swapped": flip, "preference": 1.5, "status": "identical", "text": ""})
            continue
        first, second = (answer, item.reference) if flip else (item.reference, answer)
        conversations.append(judge_messages(item.question, first, second))
        asked.append(len(records))
        records.append(None)
    verdicts = judge.verdicts(conversations, [item_seed(seed, items[i].id) for i in asked]) if conversations else []
    for position, verdict in zip(asked, verdicts):
        item, flip = items[position], flips[position]
        preference = verdict.preference
        if preference is not None and flip:
            preference = 3.0 - preference
        records[position] = {"id": item.id, "swapped": flip, "preference": preference, "status": verdict.status,
                             "text": verdict.text}
    return [r for r in records if r is not None]


def judge_benchmark(config: Any, bench: bm.Benchmark, items: list[bm.Item], done: dict[str, dict],
                    bench_dir: Path) -> dict[str, Any]:
    """Judge the saved answers (first sample of each item) that have no judgement yet, then score all of them
    with alpaca-eval; returns the benchmark's metrics for results.json."""
    identity = judge_identity(config)
    _check_judge_settings(bench_dir, {**identity, "alpaca_eval": alpaca_eval_package().__version__}, config.regrade)
    path = bench_dir / "judgements.jsonl"
    judged = read_records(path)
    answers = {item.id: done[item.id]["samples"][0]["text"] for item in items}
    todo = [item for item in items if item.id not in judged]
    if todo:
        print(f"{bench.name}: judging {len(todo)} answers with {identity['judge']}", flush=True)
        judge = make_judge(config)
        try:
            for start in range(0, len(todo), config.chunk):
                records = _judge_chunk(judge, todo[start:start + config.chunk], answers, config.seed)
                append_records(path, records)
                judged.update({r["id"]: r for r in records})
        finally:
            judge.close()
    return _metrics(config, bench, items, done, judged, identity, answers)


def _metrics(config: Any, bench: bm.Benchmark, items: list[bm.Item], done: dict[str, dict], judged: dict[str, dict],
             identity: dict, answers: dict[str, str]) -> dict[str, Any]:
    label = config.label or Path(config.model).resolve().name
    annotations = [{"instruction": item.question, "output_1": item.reference, "output_2": answers[item.id],
                    "generator_1": item.meta["generator"], "generator_2": label, "annotator": identity["judge"],
                    "preference": judged[item.id]["preference"]} for item in items]
    statuses = [judged[item.id]["status"] for item in items]
    usable = sum(1 for a in annotations if a["preference"] is not None)
    unparsed, too_long = statuses.count("unparsed"), statuses.count("too_long")
    if not usable:
        raise JudgeUnavailable(f"{bench.name}: the judge gave no usable verdict on {len(items)} items ({unparsed} "
                               f"unparsed, {too_long} too long for its context; see {config.out}/{bench.name}/"
                               "judgements.jsonl); use a stronger judge and --regrade")
    gamed = (Path(config.data_dir) if config.data_dir else bm.default_data_dir()) / "alpacaeval" / GAMED_FILE
    try:
        scores = winrates(annotations, gamed)
    except bm.BenchmarkError:
        raise
    except Exception as err:  # the GLM's own failure (too few verdicts to fit): loud, never a silent 0
        raise bm.BenchmarkError(f"{bench.name}: alpaca-eval's length-controlled win rate failed on {usable} "
                                f"verdicts ({type(err).__name__}: {err})") from None
    samples = [done[item.id]["samples"][0] for item in items]
    metrics = {"items": float(len(items)), "samples": float(config.n), "accuracy": scores["length_controlled_winrate"] / 100,
               "lc_win_rate": scores["length_controlled_winrate"] / 100, "win_rate": scores["win_rate"] / 100,
               "discrete_win_rate": scores["discrete_win_rate"] / 100, "standard_error": scores["standard_error"] / 100,
               "lc_standard_error": scores["lc_standard_error"] / 100, "n_wins": scores["n_wins"],
               "n_wins_base": scores["n_wins_base"], "n_draws": scores["n_draws"], "judged": float(usable),
               "unparsed_verdicts": float(unparsed), "judge_prompt_too_long": float(too_long),
               "no_answer": sum(1 for s in samples if not s["text"].strip()) / len(samples),
               "truncated": sum(1 for s in samples if not s["finished"]) / len(samples),
               "mean_tokens": sum(s["tokens"] for s in samples) / len(samples), "grader_failures": 0.0,
               "judge": identity["judge"], "judge_verdict": identity["verdict"], "judge_template": identity["template"],
               "baseline": ", ".join(sorted({str(item.meta["generator"]) for item in items}))}
    print(f"{bench.name}: length-controlled win rate {scores['length_controlled_winrate']:.1f}%, win rate "
          f"{scores['win_rate']:.1f}% against {metrics['baseline']}, judged by {identity['judge']} "
          f"({identity['verdict']}); {usable} verdicts used, {unparsed} unparsed, {too_long} too long for the judge",
          flush=True)
    return metrics
