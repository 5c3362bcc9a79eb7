"""Prompts longer than the model's context: an outcome of their own, not "no answer" or "truncated".

Such a prompt is not generated (its samples are empty and score 0). Counted with the others it read as "no
answer 100%, truncated 100%", which points at --max-tokens while the cause was only in generations.jsonl.
Here those samples are flagged (``prompt_too_long``, with the prompt's token count), counted apart in
results.json and explained on the console with the fix.
"""

from __future__ import annotations

from typing import Any, Optional

PROMPT_TOO_LONG = "prompt_too_long"  # sample flag, and the metric: share of samples whose prompt did not fit
_OLD_NOTE = "does not fit the context of"  # generations saved before the flag: recognised by their note


def too_long_fields(prompt_tokens: int, context: int) -> dict[str, Any]:
    """What a sample of a prompt that does not fit records (kept through --regrade)."""
    return {PROMPT_TOO_LONG: True, "prompt_tokens": prompt_tokens,
            "note": f"prompt of {prompt_tokens} tokens does not fit the context of {context}"}


def is_prompt_too_long(sample: dict[str, Any]) -> bool:
    return bool(sample.get(PROMPT_TOO_LONG)) or _OLD_NOTE in str(sample.get("note", ""))


def outcome_fractions(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Shares of samples without an answer, cut at --max-tokens, and with a prompt over the context; a sample
    counts in one of the first two only when its prompt fitted."""
    n = max(len(samples), 1)
    generated = [s for s in samples if not is_prompt_too_long(s)]
    return {"no_answer": sum(1 for s in generated if s.get("pred") is None) / n,
            "truncated": sum(1 for s in generated if not s["finished"]) / n,
            PROMPT_TOO_LONG: (len(samples) - len(generated)) / n}


def too_long_advice(bench: str, metrics: dict[str, Any], context: int, model_limit: Optional[int],
                    max_model_len: int, template: str) -> str:
    """One console line: how many prompts did not fit, that they scored 0, and what to change."""
    items = int(metrics.get("items", 0))
    share = float(metrics.get(PROMPT_TOO_LONG, 0.0))
    if max_model_len and model_limit and max_model_len < model_limit:
        fix = f"raise --max-model-len (now {max_model_len}; the model allows {model_limit})"
    else:
        fix = "use a model with a longer context"
        if template == "chat":
            fix += " or a shorter prompt (--template plain, without the chat template and system instruction)"
    return (f"{bench}: {round(share * items)} of {items} prompts ({100 * share:.0f}%) are longer than the context of "
            f"{context} tokens: not generated, scored 0 (counted as prompt_too_long, not as no answer or truncated); "
            f"{fix}")
