"""Turn rows into token ids with a loss mask on response tokens only.

Two row shapes: prompt/response columns (names configurable, dotted paths allowed, as in the reference's
parquet layout ``extra_info.question`` / ``extra_info.answer``), or a chat ``messages`` list where every
assistant turn is trained on. Prompts are rendered with the tokenizer's chat template (``template="chat"``)
or a plain format string (``template="plain"``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field as dc_field
from typing import Any, Iterable, Literal

from megatron_sft.config import DataConfig
from megatron_sft.data.sources import DataError, Row, field


@dataclass
class Example:
    """One tokenised row. ``target_mask[i]`` is 1 where token i is trained on (predicted from tokens < i)."""

    input_ids: list[int]
    target_mask: list[int]
    where: str = ""
    truncated: bool = False  # cut to max_length by the truncation policy

    def __len__(self) -> int:
        return len(self.input_ids)


class Formatter:
    def __init__(self, tokenizer: Any, config: DataConfig):
        if config.template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template; set data.template=plain (with data.plain_template) "
                "or use a tokenizer that ships one"
            )
        if config.add_eos and tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; set data.add_eos=false or use a tokenizer with one")
        self.tokenizer = tokenizer
        self.config = config

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _text(self, row: Row, key: str) -> str:
        value = field(row, key)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{row.where}: field {key!r} must be a non-empty string, got {value!r:.80}")
        return value

    def __call__(self, row: Row) -> Example:
        if row.error is not None:  # a line the reader could not decode (read_rows(bad_lines="yield"))
            raise DataError(f"{row.where}: {row.error}")
        if self.config.messages_key in row.record:
            ids, mask = self._messages(row)
        else:
            ids, mask = self._prompt_response(row)
        return self._fit(Example(ids, mask, row.where))

    def _prompt_response(self, row: Row) -> tuple[list[int], list[int]]:
        prompt, response = self._text(row, self.config.prompt_key), self._text(row, self.config.response_key)
        if self.config.template == "chat":
            prompt_text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            prompt_text = self.config.plain_template.format(prompt=prompt)
        prompt_ids, response_ids = self._ids(prompt_text), self._ids(response)
        if self.config.add_eos:
            response_ids.append(self.tokenizer.eos_token_id)
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)

    def _messages(self, row: Row) -> tuple[list[int], list[int]]:
        messages = field(row, self.config.messages_key)
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"{row.where}: {self.config.messages_key!r} must be a list of {{role, content}} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{row.where}: no assistant message to train on")
        if self.config.template != "chat":
            raise DataError(f"{row.where}: chat messages need data.template=chat")
        render = self.tokenizer.apply_chat_template
        ids = self._ids(render(messages, tokenize=False))
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._ids(render(messages[:i], tokenize=False, add_generation_prompt=True)) if i else []
            through = self._ids(render(messages[: i + 1], tokenize=False))
            if through[: len(before)] != before or ids[: len(through)] != through:
                raise DataError(
                    f"{row.where}: the chat template does not render earlier turns as a prefix of later ones, so "
                    "assistant tokens cannot be located; use prompt/response columns for this tokenizer"
                )
            mask[len(before) : len(through)] = [1] * (len(through) - len(before))
        return ids, mask

    def _fit(self, example: Example) -> Example:
        limit = self.config.max_length
        if len(example) <= limit:
            return example
        if self.config.truncation == "error":
            raise DataError(f"{example.where}: {len(example)} tokens > data.max_length={limit} (data.truncation=error)")
        if self.config.truncation == "drop":
            raise DroppedRow(f"{example.where}: longer than data.max_length={limit}; {len(example)} tokens, dropped "
                             "(data.truncation=drop)")
        if not any(example.target_mask[:limit]):
            raise DataError(f"{example.where}: the prompt alone fills data.max_length={limit}; nothing left to train on")
        return Example(example.input_ids[:limit], example.target_mask[:limit], example.where, truncated=True)


class DroppedRow(DataError):
    """A row over max_length under ``data.truncation=drop``: always skipped and counted, never an error."""


@dataclass
class TokenizeReport:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter = dc_field(default_factory=Counter)  # reason -> count
    first_skipped: list[str] = dc_field(default_factory=list)  # a few messages, for the log


def tokenize_rows(
    rows: Iterable[Row], formatter: Formatter, on_bad_row: Literal["error", "skip"] = "error"
) -> tuple[list[Example], TokenizeReport]:
    """Format every row; a bad row raises (``error``) or is skipped and counted (``skip``), never lost silently."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    report = TokenizeReport()
    examples: list[Example] = []
    for row in rows:
        report.rows += 1
        try:
            example = formatter(row)
        except DataError as err:
            if on_bad_row == "error" and not isinstance(err, DroppedRow):
                raise DataError(f"{err} (set data.on_bad_row=skip to skip and count such rows)") from None
            reason = re.split(r";| \(at ", str(err).split(": ", 1)[-1])[0][:80]
            report.skipped[reason] += 1
            if len(report.first_skipped) < 5:
                report.first_skipped.append(str(err))
            continue
        report.truncated += example.truncated
        examples.append(example)
    report.kept = len(examples)
    if not examples:
        raise DataError(f"no usable rows out of {report.rows}: {dict(report.skipped)}")
    return examples, report
