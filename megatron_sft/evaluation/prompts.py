"""Turning a benchmark question into the token ids the model sees.

``chat``: the tokenizer's chat template, the benchmark's instruction as the system turn (the reference's
math prompt, "Please reason step by step, and put your final answer within \\boxed{}.") and the question as the
user turn; templates that refuse a system turn get the instruction after the question instead. ``plain``: the
training format string (``data.plain_template``, ``{prompt}`` = question and instruction), so that a model
fine-tuned with the plain template is asked the way it was trained.
"""

from __future__ import annotations

from typing import Any


def render(tokenizer: Any, question: str, instruction: str, template: str, plain_template: str = "{prompt}\n") -> str:
    if template == "plain":
        prompt = f"{question}\n\n{instruction}" if instruction else question
        return plain_template.format(prompt=prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: use --template plain (with --plain-template)")
    messages = [{"role": "user", "content": question}]
    if instruction:
        try:
            return tokenizer.apply_chat_template([{"role": "system", "content": instruction}] + messages,
                                                 tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role (jinja raise_exception)
            messages = [{"role": "user", "content": f"{question}\n\n{instruction}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer: Any, text: str, template: str) -> list[int]:
    """Chat templates write their own BOS; a plain prompt gets the tokenizer's special tokens."""
    return list(tokenizer(text, add_special_tokens=(template == "plain"))["input_ids"])
