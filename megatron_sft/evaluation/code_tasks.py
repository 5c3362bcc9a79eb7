"""HumanEval+ / MBPP+ problems from the local evalplus files, and their expected outputs.

evalplus computes the expected outputs by running each canonical solution on the base and plus inputs
(trusted code); they are cached next to the generations, per task, so a resumed or re-graded run does not
recompute them. Nothing is downloaded: the problems come from the copies in evaluation/data.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from megatron_sft.evaluation.benchmarks import BenchmarkError, read_evalplus


def evalplus_dataset(bench_name: str) -> str:
    return "humaneval" if bench_name.startswith("humaneval") else "mbpp"


def load_problems(path: Path, dataset: str) -> dict[str, dict]:
    try:
        from evalplus.data.mbpp import mbpp_deserialize_inputs
    except ImportError:
        raise BenchmarkError("code benchmarks are graded with evalplus: pip install 'megatron-sft[eval]'") from None
    problems = read_evalplus(path)
    if dataset == "mbpp":
        for task_id, problem in problems.items():
            problem["base_input"] = mbpp_deserialize_inputs(task_id, problem["base_input"])
            problem["plus_input"] = mbpp_deserialize_inputs(task_id, problem["plus_input"])
    return problems


def expected_outputs(problems: dict[str, dict], task_ids: list[str], dataset: str, cache: Path) -> dict[str, dict]:
    """Expected base/plus outputs and reference times for ``task_ids`` (cached in ``cache``)."""
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
    from evalplus.gen.util import trusted_exec

    known: dict[str, dict] = pickle.loads(cache.read_bytes()) if cache.is_file() else {}
    missing = [t for t in task_ids if t not in known]
    not_none = MBPP_OUTPUT_NOT_NONE_TASKS if dataset == "mbpp" else []
    for task_id in missing:
        problem = problems[task_id]
        code = problem["prompt"] + problem["canonical_solution"]
        oracle = {}
        for split in ("base", "plus"):
            oracle[split], oracle[f"{split}_time"] = trusted_exec(
                code, problem[f"{split}_input"], problem["entry_point"], record_time=True,
                output_not_none=problem["entry_point"] in not_none)
        known[task_id] = oracle
    if missing:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(known))
        tmp.replace(cache)
    return {t: known[t] for t in task_ids}
