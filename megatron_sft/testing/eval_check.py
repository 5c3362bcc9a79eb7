"""Helpers for the evaluation tests: grader functions that misbehave on purpose (they must be importable for
the spawned grading workers)."""

from __future__ import annotations

import os
import time


def slow_or_crashing_grader(action: str, value: float) -> dict:
    if action == "sleep":
        time.sleep(value)
    elif action == "exit":
        os._exit(3)
    elif action == "raise":
        raise RuntimeError("bad output")
    return {"score": value}
