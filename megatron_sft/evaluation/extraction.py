"""Pulling the final answer out of a completion: the last \\boxed{...}, or the chosen option letter.

Answers that cannot be found give None; the grader scores them 0, never raises.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (braces balanced); None when there is none or the last one is
    unclosed (a truncated answer does not fall back to an earlier box)."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    depth, start = 1, matches[-1].end()
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\s*\{(.*)\}$", re.S)
_ANSWER_IS = re.compile(  # the keyword in any case, the letter in capitals ("the answer is a ..." is no choice)
    r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*:?\s*(?:\*\*)?\s*[\(\[]?\s*([A-Z])\s*[\)\]]?(?![A-Za-z])")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[\).:\s]|$)")


def _strip_wrappers(answer: str) -> str:
    answer = answer.strip().strip("$").strip()
    while (match := _TEXT_WRAPPER.match(answer)) is not None:
        answer = match.group(1).strip()
    return answer


def extract_choice(completion: str, options: Mapping[str, str]) -> Optional[str]:
    """The option letter a completion chose, or None.

    Order: the last \\boxed{} (a letter, "(B)", "B. text", \\text{B}, or an option's exact text), then the last
    "answer is (B)" / "Answer: B", then a completion that is only a letter."""
    letters = set(options)
    boxed = last_boxed(completion)
    if boxed is not None:
        inner = _strip_wrappers(boxed)
        match = _LEADING_LETTER.match(inner)
        if match and match.group(1) in letters:
            return match.group(1)
        by_text = {text.strip().lower(): letter for letter, text in options.items()}
        if inner.lower() in by_text:
            return by_text[inner.lower()]
    for match in reversed(list(_ANSWER_IS.finditer(completion))):
        letter = match.group(1)
        if letter in letters:
            return letter
    match = _LEADING_LETTER.match(completion.strip())
    if match and match.group(1) in letters and len(completion.strip()) <= 3:
        return match.group(1)
    return None
