"""What each training set of the paper is made of, and how a raw row becomes (prompt, response).

Every source can be replaced by local files (``--source NAME=PATH``), so the data can be fetched on a
machine with internet and prepared on one without. figfont is generated, not downloaded: reasoning-gym's
``figlet_font`` task with a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from megatron_sft.data.sources import DataError, Row, field

PairFn = Callable[[Row], tuple[str, str]]


def fields(*candidates: tuple[str, str]) -> PairFn:
    """(prompt, response) from the first candidate pair of (dotted) field names the row has."""

    def pair(row: Row) -> tuple[str, str]:
        for prompt_key, response_key in candidates:
            try:
                return field(row, prompt_key), field(row, response_key)
            except DataError:
                continue
        tried = ", ".join(f"{p}/{r}" for p, r in candidates)
        raise DataError(f"{row.where}: none of the field pairs {tried} is present (fields: {sorted(row.record)}); "
                        "pass --prompt-field and --response-field")

    return pair


def sharegpt_pair(row: Row) -> tuple[str, str]:
    """The first human turn and the reply to it, from ``conversations: [{from, value}, ...]`` (Magpie)."""
    turns = field(row, "conversations")
    if (not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2])
            or turns[0].get("from") not in ("human", "user") or turns[1].get("from") not in ("gpt", "assistant")):
        raise DataError(f"{row.where}: conversations must start with a human turn and its gpt/assistant reply")
    return turns[0].get("value"), turns[1].get("value")


@dataclass(frozen=True)
class Source:
    name: str
    hub_id: str
    pair: PairFn
    hub_config: Optional[str] = None
    sample: Optional[int] = None  # a seeded random subset of this many rows (the reference's)


@dataclass(frozen=True)
class Preparation:
    dataset: str
    description: str
    sources: tuple[Source, ...] = ()
    generated: bool = False  # figfont: made by reasoning-gym, no source


MURI_LANGUAGES = ("mar", "tel", "nep", "swa", "wol", "yor", "zul")

PREPARATIONS: dict[str, Preparation] = {p.dataset: p for p in (
    Preparation("math", "NuminaMath-CoT problems and chain-of-thought solutions", (
        Source("numina", "AI-MO/NuminaMath-CoT",
               fields(("problem", "solution"), ("extra_info.question", "extra_info.answer"), ("question", "answer"))),
    )),
    Preparation("medical", "m23k medical reasoning (question -> answer)", (
        Source("m23k", "UCSC-VLAA/m23k-tokenized",
               fields(("question", "answer"), ("prompt", "response"), ("extra_info.question", "extra_info.answer"),
                      ("extra_info.prompt", "extra_info.answer"), ("input", "output"))),
    )),
    Preparation("figfont", "reasoning-gym figlet_font, generated offline with a fixed seed", generated=True),
    Preparation("coder", "Magicoder-OSS-Instruct-75K", (
        Source("magicoder", "ise-uiuc/Magicoder-OSS-Instruct-75K", fields(("problem", "solution"))),
    )),
    Preparation("instruction_tuning", "Magpie-Pro-300K-Filtered (70k sampled) + WizardLM evol-instruct 70k", (
        Source("magpie", "Magpie-Align/Magpie-Pro-300K-Filtered", sharegpt_pair, sample=70000),
        Source("wizardlm", "WizardLMTeam/WizardLM_evol_instruct_70k", fields(("instruction", "output"))),
    )),
    Preparation("low_resource_language", "MURI-IT instruction pairs in " + ", ".join(MURI_LANGUAGES), tuple(
        Source(lang, "akoksal/muri-it-language-split", fields(("input", "output")), hub_config=lang)
        for lang in MURI_LANGUAGES
    )),
)}


def figfont_rows(size: int, seed: int) -> list[dict[str, Any]]:
    """``size`` figlet_font puzzles from reasoning-gym (deterministic for a seed; needs no network)."""
    try:
        import reasoning_gym
    except ImportError:
        raise DataError("figfont is generated with reasoning-gym: pip install reasoning-gym") from None
    dataset = reasoning_gym.create_dataset("figlet_font", seed=seed, size=size)
    return [{"question": entry["question"], "answer": entry["answer"], "font": entry["metadata"]["font"]}
            for entry in dataset]
