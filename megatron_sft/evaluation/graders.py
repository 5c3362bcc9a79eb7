"""Graders: completion + reference -> {"score": 1.0 | 0.0, "pred": what was extracted, "error": why 0}.

They run in worker processes (``workers.grade_in_workers``). Math uses math-verify on the last \\boxed{};
multiple choice compares the extracted letter; figfont uses reasoning-gym's own scorer (exact match counts,
its partial credit is kept as ``partial``); code is sanitized by evalplus and executed against the base and
plus tests with evalplus's time and memory limits, inside a sandbox (``sandbox.py``).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, Iterable

from megatron_sft.evaluation.extraction import extract_choice, last_boxed

MATH_PARSE_TIMEOUT_S = 5  # math-verify's own signal.alarm limits, per parse / verify


def grade_math(completion: str, reference: str, meta: dict) -> dict:
    answer = last_boxed(completion)
    if answer is None:
        return {"score": 0.0, "pred": None, "error": "no \\boxed{} answer"}
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = parse(f"\\boxed{{{reference}}}", extraction_config=configs, parsing_timeout=MATH_PARSE_TIMEOUT_S)
    pred = parse(f"\\boxed{{{answer}}}", extraction_config=configs, parsing_timeout=MATH_PARSE_TIMEOUT_S)
    if not gold:
        return {"score": 0.0, "pred": answer, "error": f"math-verify cannot parse the reference {reference!r}"}
    if not pred:
        return {"score": 0.0, "pred": answer, "error": "math-verify cannot parse the answer"}
    correct = verify(gold, pred, timeout_seconds=MATH_PARSE_TIMEOUT_S)
    return {"score": 1.0 if correct else 0.0, "pred": answer}


def grade_choice(completion: str, reference: str, meta: dict) -> dict:
    letter = extract_choice(completion, meta["options"])
    if letter is None:
        return {"score": 0.0, "pred": None, "error": "no option letter found"}
    return {"score": 1.0 if letter == reference else 0.0, "pred": letter}


def figfont_answer(completion: str) -> str:
    """The boxed answer if any, else the first non-empty line (the prompt asks for the word only)."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


@lru_cache(maxsize=1)
def _figlet_scorer() -> Any:
    """reasoning-gym scores through a dataset object; one per grading process (its score uses only the entry)."""
    import reasoning_gym

    return reasoning_gym.create_dataset("figlet_font", seed=0, size=1)


def grade_figfont(completion: str, reference: dict, meta: dict) -> dict:
    answer = figfont_answer(completion)
    if not answer:
        return {"score": 0.0, "pred": None, "error": "empty answer"}
    partial = float(_figlet_scorer().score_answer(answer, reference))
    return {"score": 1.0 if partial >= 1.0 else 0.0, "pred": answer, "partial": partial}


FIND_ZERO_CHECK = "_megatron_sft_find_zero_check"


def _find_zero_oracle(problem: dict, solution: str, expected: dict) -> tuple[dict, str, dict]:
    """HumanEval/32 (find_zero) has many right answers, so evalplus checks |poly(xs, x)| <= atol instead of
    comparing outputs; in evalplus 0.3.1 that branch skips recording the input as passed, so no solution,
    the canonical one included, can pass. The same check runs here as a wrapper entry point whose expected
    output is True for every input."""
    wrapper = (f"\n\ndef {FIND_ZERO_CHECK}(xs):\n    import math\n    x = find_zero(list(xs))\n"
               f"    return abs(sum(c * math.pow(x, i) for i, c in enumerate(xs))) <= {problem['atol']!r}\n")
    checked = dict(problem, entry_point=FIND_ZERO_CHECK)
    truth = {split: [True] * len(problem[f"{split}_input"]) for split in ("base", "plus")}
    truth.update({f"{split}_time": expected[f"{split}_time"] for split in ("base", "plus")})
    return checked, solution + wrapper, truth


def grade_code(completion: str, reference: Any, meta: dict) -> dict:
    """meta: ``dataset`` (humaneval | mbpp), ``problem`` (evalplus record with inputs), ``expected`` (outputs
    and times of the canonical solution), ``sandbox`` (the mechanism; default: the first that works here).
    Stops at the first failing input (evalplus ``fast_check``). ``outcome``: passed / failed / timeout /
    sandbox_error (the sandbox failed: not the model's fault, reported apart)."""
    from evalplus.eval import PASS
    from evalplus.sanitize import sanitize

    from megatron_sft.evaluation.sandbox import check_code, choose_sandbox, outcome

    problem, expected = meta["problem"], meta["expected"]
    solution = sanitize(completion, problem["entry_point"])
    if not solution.strip():
        return {"score": 0.0, "pred": None, "error": "no code found"}
    if meta["dataset"] == "humaneval" and problem["entry_point"] == "find_zero":
        problem, checked_solution, expected = _find_zero_oracle(problem, solution, expected)
    else:
        checked_solution = solution
    result = check_code(meta.get("sandbox") or choose_sandbox(), meta["dataset"], problem, checked_solution, expected)
    base, plus = result["base"], result["plus"]
    graded = {"score": 1.0 if base == PASS and plus == PASS else 0.0, "pred": solution[:4000],
              "base": 1.0 if base == PASS else 0.0, "status": {"base": base, "plus": plus}, "outcome": outcome(result)}
    return {**graded, "error": result["error"]} if "error" in result else graded


GRADERS = {"math": grade_math, "choice": grade_choice, "figfont": grade_figfont, "code": grade_code}

# grader -> (module it imports, PyPI package); the `eval` extra installs them all
GRADER_LIBRARIES = {"math": ("math_verify", "math-verify"), "figfont": ("reasoning_gym", "reasoning-gym"),
                    "code": ("evalplus", "evalplus")}
GRADER_FAILURE_PREFIXES = ("grader raised", "grader process died",  # infrastructure, not the model's answer
                           "sandbox error")


class GraderUnavailable(RuntimeError):
    """A grader's library does not import: every item would score 0, so nothing is generated."""


def check_grader_libraries(benchmarks: Iterable[tuple[str, str]]) -> None:
    """``benchmarks``: (name, grader kind) pairs. Imports each grader's library in this process before any
    generation, so a missing package fails the run up front instead of scoring every answer 0."""
    needed: dict[str, list[str]] = {}
    for name, kind in benchmarks:
        if kind in GRADER_LIBRARIES:
            needed.setdefault(kind, []).append(name)
    for kind, names in needed.items():
        module, package = GRADER_LIBRARIES[kind]
        try:
            importlib.import_module(module)
        except Exception as err:  # ImportError, or a broken install raising anything at import
            raise GraderUnavailable(
                f"{', '.join(names)} cannot be graded: `import {module}` fails ({type(err).__name__}: {err}); "
                f"install the grader with: pip install 'megatron-sft[eval]' (or pip install {package})"
            ) from None


def is_grader_failure(result: dict) -> bool:
    """True when the sample scored 0 because grading itself failed (not because of the answer)."""
    return str(result.get("error") or "").startswith(GRADER_FAILURE_PREFIXES)


def grade(kind: str, completion: str, reference: Any, meta: dict) -> dict:
    """Entry point for the worker processes."""
    return GRADERS[kind](completion, reference, meta)
