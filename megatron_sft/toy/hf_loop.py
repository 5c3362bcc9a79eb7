"""Plain transformers loops on a toy model: pre-training the base model and measuring it, independent of the
trainer (the demo's and the continuum's before/after numbers come from here, not from the code under test)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


def progress(items: Sequence[T], description: str, unit: str, every_s: float = 15.0) -> Iterator[T]:
    """A tqdm bar on a terminal; in a log file (CI, Slurm) one plain line every ``every_s`` seconds and at the
    end, instead of carriage-return redraws."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=description, unit=unit)
        return
    started = last = time.perf_counter()
    total = len(items)
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s or done == total:
            print(f"{description}: {done}/{total} {unit}s ({done / total:.0%}, {now - started:.0f}s)", file=sys.stderr,
                  flush=True)
            last = now


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_row(tokenizer, row: dict[str, str]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + eos), as the trainer formats a prompt/response row with the chat template."""
    response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return _prompt_ids(tokenizer, row["prompt"]), response


def exact_match_accuracy(model_dir: str | Path, rows: list[dict[str, str]], batch_size: int = 64) -> float:
    """Greedy decoding with transformers; a row counts when the generated answer equals the response."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [_prompt_ids(tokenizer, row["prompt"]) for row in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = (torch.arange(width).unsqueeze(0) >= torch.tensor([width - len(p) for p in prompts]).unsqueeze(1)).long()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row, generated in zip(chunk, out[:, width:]):
            answer = tokenizer.convert_ids_to_tokens([t for t in generated.tolist() if t not in tokenizer.all_special_ids])
            correct += answer == row["response"].split()
    return correct / len(rows)


def token_accuracy_and_mean_p(model_dir: str | Path, rows: list[dict[str, str]]) -> tuple[float, float]:
    """Teacher-forced: the fraction of response tokens (and eos) that are the argmax, and their mean p."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hits, probabilities = [], []
    for row in rows:
        prompt, response = encode_row(tokenizer, row)
        with torch.no_grad():
            logp = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        target = torch.tensor(response)
        hits += (logp.argmax(-1) == target).tolist()
        probabilities += logp.gather(1, target[:, None]).exp().squeeze(1).tolist()
    return sum(hits) / len(hits), sum(probabilities) / len(probabilities)


def pretrain_base_model(model_dir: Path, rows: list[dict[str, str]], steps: int, lr: float = 3e-3, seed: int = 0) -> None:
    """Plain PyTorch NLL on ``rows`` for ``steps`` steps, saved in place: the demo's imperfect base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    encoded = []
    for row in rows:
        prompt, response = encode_row(tokenizer, row)
        encoded.append((prompt + response, [-100] * len(prompt) + response))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in progress(range(steps), "pre-training the base model", "step"):
        batch = [encoded[i] for i in torch.randint(len(encoded), (32,), generator=generator).tolist()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(str(model_dir))
