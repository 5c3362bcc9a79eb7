"""Graders: completion + reference -> {"score": 1.0 | 0.0, "pred": what was extracted, "error": why 0}.

They run in worker processes (``workers.grade_in_workers``). Math uses math-verify on the last \\boxed{};
multiple choice compares the extracted letter; figfont uses reasoning-gym's own scorer (exact match counts,
its partial credit is kept as ``partial``); code is sanitized by evalplus and executed against the base and
plus tests with evalplus's time and memory limits.
"""

from __future__ import annotations

from typing import Any

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


def grade_figfont(completion: str, reference: dict, meta: dict) -> dict:
    import reasoning_gym

    answer = figfont_answer(completion)
    if not answer:
        return {"score": 0.0, "pred": None, "error": "empty answer"}
    scorer = reasoning_gym.create_dataset("figlet_font", seed=0, size=1)
    partial = float(scorer.score_answer(answer, reference))
    return {"score": 1.0 if partial >= 1.0 else 0.0, "pred": answer, "partial": partial}


def grade_code(completion: str, reference: Any, meta: dict) -> dict:
    """meta: ``dataset`` (humaneval | mbpp), ``problem`` (evalplus record with inputs), ``expected`` (outputs
    and times of the canonical solution)."""
    from evalplus.eval import PASS
    from evalplus.evaluate import check_correctness
    from evalplus.sanitize import sanitize

    problem = meta["problem"]
    solution = sanitize(completion, problem["entry_point"])
    if not solution.strip():
        return {"score": 0.0, "pred": None, "error": "no code found"}
    result = check_correctness(meta["dataset"], 0, problem, solution, meta["expected"], fast_check=True)
    base, plus = result["base"][0], result["plus"][0]
    return {"score": 1.0 if base == PASS and plus == PASS else 0.0, "pred": solution[:4000],
            "base": 1.0 if base == PASS else 0.0, "status": {"base": base, "plus": plus}}


GRADERS = {"math": grade_math, "choice": grade_choice, "figfont": grade_figfont, "code": grade_code}


def grade(kind: str, completion: str, reference: Any, meta: dict) -> dict:
    """Entry point for the worker processes."""
    return GRADERS[kind](completion, reference, meta)
