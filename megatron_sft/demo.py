"""The embedded CPU default: the whole pipeline on a tiny model and a generated task, in a couple of minutes.

1. A generated task, "shift every letter by one" (``c x m ?`` -> ``d y n``), split into train / held-out.
2. A tiny random Qwen2-shaped model, briefly pre-trained with plain PyTorch + NLL on a small disjoint set of
   rows so that it is a *capable but imperfect* base model (mean token p well above chance), which is the
   regime where the paper finds prior-leaning objectives such as -p useful.
3. ``convert hf-to-mcore``, then ``train`` with the ``p`` objective at TP=2 on 2 local processes
   (gloo on 127.0.0.1 without CUDA), then the automatic HF export.
4. Greedy-decoding exact-match accuracy of the base model and of the exported model on the held-out split,
   with transformers' own ``generate`` (independent of the training code).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode(tokenizer, row: dict[str, str]) -> tuple[list[int], list[int]]:
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
        prompt, response = _encode(tokenizer, row)
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
        prompt, response = _encode(tokenizer, row)
        encoded.append((prompt + response, [-100] * len(prompt) + response))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = [encoded[i] for i in torch.randint(len(encoded), (32,), generator=generator).tolist()]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(str(model_dir))


def fresh_output_dir(out: str | Path, overwrite: bool) -> Path:
    """An empty OUT with OUT/data/; an existing OUT is replaced only with ``overwrite``."""
    import shutil

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out")
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    return out


@dataclass
class DemoResult:
    base_accuracy: float  # exact match, greedy decoding
    tuned_accuracy: float
    base_token_accuracy: float
    tuned_token_accuracy: float
    base_mean_p: float
    first_loss: float
    last_loss: float
    steps: int
    seconds: float
    output_dir: str


def run_demo(out: str | Path, nproc: int = 2, tensor_parallel: int = 2, objective: str = "p", epochs: int = 4,
             base_steps: int = 450, overwrite: bool = False) -> DemoResult:
    from megatron_sft.commands.train import launch
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_sft.testing.tiny_models import save_tiny_hf_model
    from megatron_sft.train.config import load_config

    started = time.perf_counter()
    out = fresh_output_dir(out, overwrite)
    held_out = shift_task_rows(200, seed=1)
    base_rows = shift_task_rows(400, seed=2, exclude={r["prompt"] for r in held_out})
    train_rows = shift_task_rows(512, seed=3, exclude={r["prompt"] for r in held_out + base_rows})
    write_jsonl(out / "data" / "train.jsonl", train_rows)
    write_jsonl(out / "data" / "held_out.jsonl", held_out)

    print(f"[1/4] base model: tiny Qwen2 (4 layers, hidden 128), {base_steps} steps of plain-PyTorch NLL on "
          f"{len(base_rows)} rows", flush=True)
    base = out / "base_hf"
    save_tiny_hf_model(base, "qwen2-tied-gqa", layers=4, hidden=128, seed=0)
    pretrain_base_model(base, base_rows, base_steps)
    base_accuracy = exact_match_accuracy(base, held_out)
    base_tokens, base_p = token_accuracy_and_mean_p(base, held_out)
    print(f"      base model on the held-out split: exact match {base_accuracy:.1%}, token accuracy {base_tokens:.1%}, "
          f"mean p {base_p:.3f}", flush=True)

    print("[2/4] convert hf-to-mcore", flush=True)
    ckpt = convert_hf_to_mcore(base, out / "base_mcore", progress=False)

    config_path = out / "config.yaml"
    config_path.write_text(DEMO_CONFIG.format(
        output_dir=out / "run", checkpoint=ckpt, train=out / "data" / "train.jsonl",
        eval=out / "data" / "held_out.jsonl", tp=tensor_parallel, objective=objective, epochs=epochs,
    ))
    print(f"[3/4] megatron-sft train {config_path} --nproc {nproc}  (objective {objective}, TP={tensor_parallel})", flush=True)
    summary = launch(load_config(config_path), nproc=nproc)

    print("[4/4] held-out exact match with transformers generate (greedy)", flush=True)
    tuned_accuracy = exact_match_accuracy(summary["export"], held_out)
    tuned_tokens, tuned_p = token_accuracy_and_mean_p(summary["export"], held_out)
    result = DemoResult(
        base_accuracy=base_accuracy, tuned_accuracy=tuned_accuracy, base_token_accuracy=base_tokens,
        tuned_token_accuracy=tuned_tokens, base_mean_p=summary["first_mean_p"],
        first_loss=summary["first_loss"], last_loss=summary["last_loss"], steps=summary["steps"],
        seconds=time.perf_counter() - started, output_dir=str(out),
    )
    print(f"mean token p of the base model on the training data: {result.base_mean_p:.3f} "
          f"({'capable: prior-leaning objectives like -p are expected to help' if result.base_mean_p >= 0.5 else 'weak: NLL is expected to do better'})")
    print(f"held-out, base -> after SFT with {objective}: exact match {base_accuracy:.1%} -> {tuned_accuracy:.1%}, "
          f"token accuracy {base_tokens:.1%} -> {tuned_tokens:.1%}, mean p {base_p:.3f} -> {tuned_p:.3f}")
    print(f"training: {result.steps} steps, loss {result.first_loss:.4f} -> {result.last_loss:.4f}; "
          f"{result.seconds:.0f}s in all")
    print(f"exported HF model: {summary['export']}; logs: {out / 'run'} (tensorboard --logdir {out / 'run' / 'tensorboard'})")
    return result


DEMO_CONFIG = """\
# Written by `megatron-sft demo`; rerun with: megatron-sft train {output_dir}/../config.yaml --nproc 2
output_dir: {output_dir}
model:
  checkpoint: {checkpoint}
parallel:
  tensor: {tp}
  sequence_parallel: true
data:
  train: [{train}]
  eval: [{eval}]
  max_length: 64
  packing: true
objective:
  name: {objective}
train:
  global_batch_size: 16
  micro_batch_size: 2
  epochs: {epochs}
  eval_every_steps: 10
optim:
  lr: 3.0e-3
  warmup_ratio: 0.05
checkpoint:
  every_steps: 20
  keep_last: 1
log:
  every_steps: 5
"""
