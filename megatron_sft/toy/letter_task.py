"""The toy letter tasks of the demo and the continuum: "c x m ?" -> three to six letters, each mapped by a
fixed letter mapping (shift by one, or a substitution cipher). Generated, so nothing is downloaded."""

from __future__ import annotations

import random

LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


SHIFT_BY_ONE = {c: LETTERS[(i + 1) % 26] for i, c in enumerate(LETTERS)}


def letter_task_rows(count: int, seed: int, mapping: dict[str, str], exclude: set[str] | None = None) -> list[dict[str, str]]:
    """Rows {prompt: "c x m ?", response: mapping of each letter} with 3-6 letters, prompts unique and not in
    ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    while len(rows) < count:
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        prompt = " ".join(letters) + " ?"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "response": " ".join(mapping[c] for c in letters)})
    return rows


def shift_task_rows(count: int, seed: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """The demo's task: "c x m ?" -> "d y n" (every letter shifted by one)."""
    return letter_task_rows(count, seed, SHIFT_BY_ONE, exclude)
